"""The Triton backend's @triton.jit kernels (the design: crepa_kernels/ops/triton_loss.py and docs/triton.md).

Every coefficient comes from the call's table C [F, W] (spec.coefficient_table: C[f, 0] = 1 / Z_f, C[f, s] =
w(|o_s|) / Z_f): the kernels compute no weight, no exponential and no Z_f. Frame pair (f, k) reads C[f, column]
for the band slot of k - f (_table_column).

Maths that reaches the result is IEEE-rounded on hardware as under the interpreter: tl.sqrt_rn and tl.div_rn
(tl.sqrt and "/" compile to sqrt.approx.ftz.f32 and div.full.f32).

TRITON_INTERPRET is read when the kernels are defined, i.e. when this module is first imported.
"""
import triton
import triton.language as tl

# scalar arguments that only steer loops and masks: specialising on their value (== 1, divisible by 16) would
# compile a kernel per neighbour range and token count for nothing
# the stats rows are views at offset B*F*N: their 16-byte alignment would follow the shape
ANY_ALIGNMENT = ["p_norm_ptr", "y_norm_ptr"]
RUNTIME_ONLY = ["num_batches", "num_frames", "num_tokens", "rows_per_tile", "halo", "shifts", "num_tiles",
                "num_token_blocks", "near", "far", "slot_first", "slot_step", "num_slots"]


@triton.jit
def _to_element(x, ptr):
    """x in ptr's element type; 16-bit outputs round through fp32 (the interpreter's direct fp64 -> bf16
    cast is wrong; fp64 -> fp32 -> bf16 double rounding differs from direct rounding by <= 1 ulp, rarely)."""
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        x = x.to(tl.float32)
    return x.to(ptr.dtype.element_ty)

@triton.jit
def _div(x, y, COMPUTE: tl.constexpr):
    """x / y rounded to nearest: tl.div_rn takes fp32 only, and fp64 "/" is div.rn.f64 already."""
    if COMPUTE == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)

# Tiny eps (see csrc/crepa_math.h): below eps = sqrt(smallest normal) a product of two clamped norms underflows.
# The cosine's denominator is then held at the smallest normal: the product of two norms of live vectors (norms
# >= sqrt(smallest normal), whose squares the kernels resolve) never lies below it, so only a pair with a zero
# vector meets the floor, and its dot product is 0: 0, not 0 / 0. A is held within the finite range: alpha / eps^2
# of a pair of zero vectors would be inf, and inf times a zero vector NaN; any finite A gives them 0.
@triton.jit
def _smallest_normal(COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return 2.2250738585072014e-308
    else:
        return 1.1754943508222875e-38

@triton.jit
def _largest_finite(COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return 1.7976931348623157e308
    else:
        return 3.4028234663852886e38

@triton.jit
def _sqrt(x, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)

@triton.jit
def _work_item(num_batches, num_token_blocks, num_tiles):
    """(batch, token block, frame tile) of this program. The grid is one flat list of work items laid over
    axes 0 and 1 (plan_grid), token blocks fastest: gridDim.y/z stop at 65,535, gridDim.x at 2^31 - 1. Items
    past the end (the last row of axis 1) get batch >= num_batches and are masked off by the caller."""
    item = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    token_block = item % num_token_blocks
    rest = item // num_token_blocks
    return rest // num_tiles, token_block, rest % num_tiles

@triton.jit
def _table_column(band_slot, offset):
    """The coefficient table's column of the band slot ``band_slot`` of frame offset ``offset``: the table holds
    offset 0 first, then the others in increasing order; the band holds them all in increasing order."""
    return tl.where(offset < 0, band_slot + 1, tl.where(offset == 0, 0, band_slot))


@triton.jit
def _pair_coefficients(rows, cols, table_ptr, table_rows, num_frames, near, far, num_slots,
                       ROW_POINTERS: tl.constexpr):
    """(C[f, k], is_term[f, k]) for row frames f and column frames k ([FRAMES] each): is_term marks the pairs
    that enter L[f] (k = f or a neighbour, both inside [0, F)); C is read from the table there, 0 elsewhere.

    The table's columns are offset 0, then -far..-near, then near..far (cumulative: every distance in between;
    adjacent: near = far), so offset +-distance sits at half +- (distance - near) + (1 or 0): no division.
    Two equivalent address forms, chosen by what compiled without spills (tools/compile_triton.py): the shifted
    tiling's kernels read through ``table_rows`` (the pointers to the rows' table rows, [FRAMES]); the others
    through int32 offsets from the table's base (F W < 2^31)."""
    delta = cols[None, :] - rows[:, None]
    distance = tl.abs(delta)
    inside = ((rows >= 0) & (rows < num_frames))[:, None] & ((cols >= 0) & (cols < num_frames))[None, :]
    is_term = ((delta == 0) | ((distance >= near) & (distance <= far))) & inside
    half = num_slots // 2
    if ROW_POINTERS:
        rank = distance - near
        column = tl.where(delta > 0, half + 1 + rank, tl.where(delta < 0, half - rank, 0))
        return tl.load(table_rows[:, None] + column, mask=is_term, other=0.0), is_term
    else:
        rank = (distance - near).to(tl.int32)
        column = tl.where(delta > 0, half + 1 + rank, tl.where(delta < 0, half - rank, 0))
        offsets = (rows * num_slots).to(tl.int32)[:, None] + column
        return tl.load(table_ptr + offsets, mask=is_term, other=0.0), is_term


@triton.jit
def _window_pairs(first_col, shift, num_frames, near, far, FRAMES: tl.constexpr):
    """Whether the column window starting at first_col, ``shift`` windows from the rows, holds frames of the
    video and a pair of some L[f]: its frame distances run over |shift| FRAMES -+ (FRAMES - 1). Only the
    windows between the offsets of a large adjacent d hold none."""
    nearest = tl.abs(shift) * FRAMES - FRAMES + 1
    farthest = tl.abs(shift) * FRAMES + FRAMES - 1
    inside = (first_col + FRAMES > 0) & (first_col < num_frames)
    return inside & ((shift == 0) | ((near <= farthest) & (far >= nearest)))

@triton.jit
def _row_scale(grad_loss_ptr, batch, frames, frame_ok, num_frames, num_tokens, COMPUTE: tl.constexpr):
    """-grad_L[f] / N for the frames f: alpha[f, k] = this times C[f, k]."""
    grad_loss = tl.load(grad_loss_ptr + batch * num_frames + frames, mask=frame_ok, other=0.0).to(COMPUTE)
    return _div(-grad_loss, tl.cast(num_tokens, COMPUTE), COMPUTE)

@triton.jit
def _a_matrix(rows, cols, table_ptr, table_rows, row_scale, inv_p, inv_y, num_frames, near, far, num_slots,
              SHIFTED: tl.constexpr, COMPUTE: tl.constexpr):
    """A[n, f, k] = alpha[f, k] / (|p_f| |y_k|) (clamped norms) for row frames f and column frames k, held
    within the finite range (tiny eps, above)."""
    c, _ = _pair_coefficients(rows, cols, table_ptr, table_rows, num_frames, near, far, num_slots, SHIFTED)
    a = (row_scale[:, None] * c)[None, :, :] * inv_p[:, :, None] * inv_y[:, None, :]
    return tl.minimum(tl.maximum(a, -_largest_finite(COMPUTE)), _largest_finite(COMPUTE))

@triton.jit
def _dot_split(a_hi, a_lo, x):
    return tl.dot(a_hi, x, tl.dot(a_lo, x, out_dtype=tl.float32), out_dtype=tl.float32)

@triton.jit
def _dot_a(a, x, SPLIT_BF16_DOT: tl.constexpr, COMPUTE: tl.constexpr):
    """a @ x with a in COMPUTE: for bf16 x as hi + lo bf16 halves of a on tensor cores, else in COMPUTE."""
    if SPLIT_BF16_DOT:
        a_hi = a.to(tl.bfloat16)
        return _dot_split(a_hi, (a - a_hi.to(tl.float32)).to(tl.bfloat16), x)
    else:
        return tl.dot(a, x.to(COMPUTE), input_precision="ieee", out_dtype=COMPUTE)

@triton.jit
def _stats(norm_ptr, batch, frames, tokens, ok, num_frames, num_tokens):
    return tl.load(norm_ptr + batch * num_frames * num_tokens + frames[None, :] * num_tokens + tokens[:, None],
                   mask=ok, other=1.0)

@triton.jit
def _forward_window(
    weighted, shift, rows, window, row_ok, tokens, token_ok, out_ok, p_row, band_row, batch, target_ptr,
    sy_b, sy_f, sy_n, sy_d, sp_d, p_norm_ptr, y_norm_ptr, table_ptr, table_rows, first_frame, shifts,
    num_frames, num_tokens, dim, near, far, eps, slot_first, slot_step, num_slots,
    NATIVE_DOT: tl.constexpr, SHIFTED: tl.constexpr, COMPUTE: tl.constexpr, FRAMES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The forward's work on the column window ``shift`` windows from the row window: G over D, the cosines,
    the weighted sum of the rows' terms it holds (returned, added to ``weighted``), the band slots it owns
    and, for shift 0, the norms."""
    cols = rows + shift * FRAMES  # the column window: target frames k
    col_ok = (cols >= 0) & (cols < num_frames)
    y_row = target_ptr + batch * sy_b + tokens[:, None, None] * sy_n + cols[None, :, None] * sy_f
    p_ok = token_ok[:, None, None] & row_ok[None, :, None]
    y_ok = token_ok[:, None, None] & col_ok[None, :, None]
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    # G[n, f, k] = p_f . y_k over D, with the squared norms
    gram = tl.zeros((BLOCK_N, FRAMES, FRAMES), COMPUTE)
    p_squares = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
    y_squares = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
    if not SHIFTED or _window_pairs(first_frame + shift * FRAMES, shift, num_frames, near, far, FRAMES):
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + dims
            d_ok = (d < dim)[None, None, :]
            p = tl.load(p_row + d[None, None, :] * sp_d, mask=p_ok & d_ok, other=0.0)
            y = tl.load(y_row + d[None, None, :] * sy_d, mask=y_ok & d_ok, other=0.0)
            p_wide = p.to(COMPUTE)
            y_wide = y.to(COMPUTE)
            p_squares += tl.sum(p_wide * p_wide, axis=2)
            y_squares += tl.sum(y_wide * y_wide, axis=2)
            if NATIVE_DOT:
                gram = tl.dot(p, tl.trans(y, (0, 2, 1)), gram, out_dtype=COMPUTE)
            else:
                gram = tl.dot(p_wide, tl.trans(y_wide, (0, 2, 1)), gram, input_precision="ieee",
                              out_dtype=COMPUTE)
    coefficient, is_term = _pair_coefficients(rows, cols, table_ptr, table_rows, num_frames, near, far, num_slots,
                                              SHIFTED)
    p_norm = tl.maximum(_sqrt(p_squares, COMPUTE), eps)
    y_norm = tl.maximum(_sqrt(y_squares, COMPUTE), eps)
    # [BLOCK_N, f, k]; the floor: tiny eps, above
    cosine = _div(gram, tl.maximum(p_norm[:, :, None] * y_norm[:, None, :], _smallest_normal(COMPUTE)), COMPUTE)
    # select, not multiply by a zero coefficient: a NaN cosine of an unrelated frame pair must not leak in
    weighted += tl.sum(tl.where(is_term[None, :, :], cosine * coefficient[None, :, :], 0.0), axis=2)

    # the diagonal window's column frames are the rows: their norms are written from it
    stat = batch * num_frames * num_tokens + rows[None, :] * num_tokens + tokens[:, None]
    tl.store(p_norm_ptr + stat, p_norm, mask=out_ok & (shift == 0))
    tl.store(y_norm_ptr + stat, y_norm, mask=out_ok & (shift == 0))
    delta = cols[None, :] - rows[:, None]
    for slot in range(num_slots):
        offset = slot_first + slot * slot_step
        band = tl.sum(tl.where((delta == offset)[None, :, :], cosine, 0.0), axis=2)
        if SHIFTED:
            # cos(p_f, y_{f + offset}) is written by the window holding frame f + offset (clamped to the
            # visited ones, for frames outside the video: their cosine is 0 in every window)
            owner = (window + offset + (shifts + 1) * FRAMES) // FRAMES - (shifts + 1)
            owner = tl.minimum(tl.maximum(owner, -shifts), shifts)
            tl.store(band_row + slot * num_tokens, band, mask=out_ok & (owner == shift)[None, :])
        else:
            tl.store(band_row + slot * num_tokens, band, mask=out_ok)
    return weighted

@triton.jit(do_not_specialize=RUNTIME_ONLY, do_not_specialize_on_alignment=ANY_ALIGNMENT)
def _crepa_forward_kernel(
    proj_ptr, target_ptr, p_norm_ptr, y_norm_ptr, band_ptr, partial_ptr, table_ptr,
    num_batches, num_frames, num_tokens, dim,
    sp_b, sp_f, sp_n, sp_d, sy_b, sy_f, sy_n, sy_d,
    rows_per_tile, halo, shifts, num_tiles, num_token_blocks,
    near, far, eps_ptr,
    slot_first, slot_step, num_slots,
    FP64: tl.constexpr, NATIVE_DOT: tl.constexpr, SHIFTED: tl.constexpr,
    FRAMES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if FP64 else tl.float32
    eps = tl.load(eps_ptr).to(COMPUTE)  # fp64 on the device (scalar_tensor)
    batch, token_block, tile = _work_item(num_batches, num_token_blocks, num_tiles)
    first_row = tile * rows_per_tile
    window = tl.arange(0, FRAMES).to(tl.int64)
    rows = first_row - halo + window  # the row window: proj frames f
    tokens = token_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = (rows >= 0) & (rows < num_frames)
    token_ok = (tokens < num_tokens) & (batch < num_batches)
    p_row = proj_ptr + batch * sp_b + tokens[:, None, None] * sp_n + rows[None, :, None] * sp_f
    # this program writes only its own rows; the halo rows belong to the neighbouring tiles
    writes = row_ok & (rows >= first_row) & (rows < first_row + rows_per_tile)
    out_ok = token_ok[:, None] & writes[None, :]
    table_rows = table_ptr + rows * num_slots  # C[f, :] of the row frames (shifted mode)
    band_row = band_ptr + batch * num_frames * num_slots * num_tokens + rows[None, :] * num_slots * num_tokens \
        + tokens[:, None]

    weighted = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
    if SHIFTED:
        for shift in range(-shifts, shifts + 1):
            weighted = _forward_window(weighted, shift, rows, window, row_ok, tokens, token_ok, out_ok, p_row,
                                       band_row, batch, target_ptr, sy_b, sy_f, sy_n, sy_d, sp_d, p_norm_ptr,
                                       y_norm_ptr, table_ptr, table_rows, first_row - halo, shifts, num_frames,
                                       num_tokens, dim, near, far, eps, slot_first, slot_step, num_slots,
                                       NATIVE_DOT, True, COMPUTE, FRAMES, BLOCK_N, BLOCK_D)
    else:  # one window, its own column window (a runtime loop of one window spilled on sm_90)
        weighted = _forward_window(weighted, 0, rows, window, row_ok, tokens, token_ok, out_ok, p_row, band_row,
                                   batch, target_ptr, sy_b, sy_f, sy_n, sy_d, sp_d, p_norm_ptr, y_norm_ptr,
                                   table_ptr, table_rows, first_row - halo, shifts, num_frames, num_tokens, dim,
                                   near, far, eps, slot_first, slot_step, num_slots, NATIVE_DOT, False, COMPUTE,
                                   FRAMES, BLOCK_N, BLOCK_D)
    partial = tl.sum(tl.where(out_ok, weighted, 0.0), axis=0)
    tl.store(partial_ptr + (batch * num_frames + rows) * num_token_blocks + token_block, partial,
             mask=writes & (batch < num_batches))

@triton.jit(do_not_specialize=RUNTIME_ONLY, do_not_specialize_on_alignment=ANY_ALIGNMENT)
def _crepa_backward_kernel(
    proj_ptr, target_ptr, p_norm_ptr, y_norm_ptr, band_ptr, grad_loss_ptr, grad_proj_ptr, grad_target_ptr,
    table_ptr,
    num_batches, num_frames, num_tokens, dim,
    sp_b, sp_f, sp_n, sp_d, sy_b, sy_f, sy_n, sy_d,
    gp_b, gp_f, gp_n, gp_d, gy_b, gy_f, gy_n, gy_d,
    rows_per_tile, halo, shifts, num_tiles, num_token_blocks,
    near, far, eps_ptr,
    slot_first, slot_step, num_slots,
    FP64: tl.constexpr, SPLIT_BF16_DOT: tl.constexpr, SHIFTED: tl.constexpr, PROJ_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr, FRAMES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if FP64 else tl.float32
    eps = tl.load(eps_ptr).to(COMPUTE)  # fp64 on the device (scalar_tensor)
    batch, token_block, tile = _work_item(num_batches, num_token_blocks, num_tiles)
    first_row = tile * rows_per_tile
    rows = first_row - halo + tl.arange(0, FRAMES).to(tl.int64)
    tokens = token_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = (rows >= 0) & (rows < num_frames)
    batch_ok = batch < num_batches
    token_ok = (tokens < num_tokens) & batch_ok
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    stat_ok = token_ok[:, None] & row_ok[None, :]

    p_norm = _stats(p_norm_ptr, batch, rows, tokens, stat_ok, num_frames, num_tokens)
    y_norm = _stats(y_norm_ptr, batch, rows, tokens, stat_ok, num_frames, num_tokens)
    table_rows = table_ptr + rows * num_slots  # C[f, :] of the row frames
    row_scale = _row_scale(grad_loss_ptr, batch, rows, row_ok & batch_ok, num_frames, num_tokens, COMPUTE)

    # s_p[f] = sum_k alpha[f, k] cos[f, k] and s_y[k] = sum_f alpha[f, k] cos[f, k], from the saved band
    band_column = band_ptr + batch * num_frames * num_slots * num_tokens + tokens[:, None]
    s_p = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
    s_y = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
    for slot in range(num_slots):
        offset = slot_first + slot * slot_step
        column = _table_column(slot, offset)
        as_row = tl.load(band_column + rows[None, :] * num_slots * num_tokens + slot * num_tokens, mask=stat_ok,
                         other=0.0)  # cos(p_f, y_{f + offset}) for f = rows
        k_ok = (rows + offset >= 0) & (rows + offset < num_frames)
        c_rows = tl.load(table_rows + column, mask=row_ok & k_ok, other=0.0)  # C[f, f + offset]
        s_p += tl.where(k_ok[None, :], as_row * (row_scale * c_rows)[None, :], 0.0)
        sources = rows - offset  # cos(p_{k - offset}, y_k) for k = rows
        source_ok = (sources >= 0) & (sources < num_frames)
        as_column = tl.load(band_column + sources[None, :] * num_slots * num_tokens + slot * num_tokens,
                            mask=token_ok[:, None] & source_ok[None, :], other=0.0)
        source_scale = _row_scale(grad_loss_ptr, batch, sources, source_ok & batch_ok, num_frames, num_tokens,
                                  COMPUTE)
        c_sources = tl.load(table_ptr + sources * num_slots + column, mask=source_ok, other=0.0)  # C[k - o, k]
        s_y += tl.where(source_ok[None, :], as_column * (source_scale * c_sources)[None, :], 0.0)
    p_scale = tl.where(p_norm > eps, _div(s_p, p_norm * p_norm, COMPUTE), 0.0)
    y_scale = tl.where(y_norm > eps, _div(s_y, y_norm * y_norm, COMPUTE), 0.0)
    one = tl.full((BLOCK_N, FRAMES), 1.0, COMPUTE)
    inv_p = _div(one, p_norm, COMPUTE)
    inv_y = _div(one, y_norm, COMPUTE)
    if not SHIFTED:  # the window is its own column window: A once for the whole D sweep
        a = _a_matrix(rows, rows, table_ptr, table_rows, row_scale, inv_p, inv_y, num_frames, near, far, num_slots,
                      False, COMPUTE)
        a_t = tl.trans(a, (0, 2, 1))
        if SPLIT_BF16_DOT:
            a_hi = a.to(tl.bfloat16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
            a_t_hi = tl.trans(a_hi, (0, 2, 1))
            a_t_lo = tl.trans(a_lo, (0, 2, 1))

    p_row = proj_ptr + batch * sp_b + tokens[:, None, None] * sp_n + rows[None, :, None] * sp_f
    y_row = target_ptr + batch * sy_b + tokens[:, None, None] * sy_n + rows[None, :, None] * sy_f
    gp_row = grad_proj_ptr + batch * gp_b + tokens[:, None, None] * gp_n + rows[None, :, None] * gp_f
    gy_row = grad_target_ptr + batch * gy_b + tokens[:, None, None] * gy_n + rows[None, :, None] * gy_f
    row_load_ok = token_ok[:, None, None] & row_ok[None, :, None]
    writes = row_ok & (rows >= first_row) & (rows < first_row + rows_per_tile)
    write_ok = token_ok[:, None, None] & writes[None, :, None]
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + dims
        d_ok = (d < dim)[None, None, :]
        p = tl.load(p_row + d[None, None, :] * sp_d, mask=row_load_ok & d_ok, other=0.0)
        y = tl.load(y_row + d[None, None, :] * sy_d, mask=row_load_ok & d_ok, other=0.0)
        p_wide = p.to(COMPUTE)
        y_wide = y.to(COMPUTE)
        if SHIFTED:
            # grad_P[f] gathers A[f, k] y_k from every column window, grad_Y[k] gathers A[f, k] p_f from
            # every row window; A is rebuilt per window from the saved norms (a few loads, no division)
            grad_p = -(p_scale[:, :, None] * p_wide)
            grad_y = -(y_scale[:, :, None] * y_wide)
            for shift in range(-shifts, shifts + 1):
                cols = rows + shift * FRAMES
                col_ok = (cols >= 0) & (cols < num_frames)
                col_stat_ok = token_ok[:, None] & col_ok[None, :]
                col_load_ok = token_ok[:, None, None] & col_ok[None, :, None] & d_ok
                if PROJ_GRAD:
                    inv_y_cols = _div(one, _stats(y_norm_ptr, batch, cols, tokens, col_stat_ok, num_frames,
                                                  num_tokens), COMPUTE)
                    a = _a_matrix(rows, cols, table_ptr, table_rows, row_scale, inv_p, inv_y_cols,
                                  num_frames, near, far, num_slots, True, COMPUTE)
                    y_cols = tl.load(target_ptr + batch * sy_b + tokens[:, None, None] * sy_n
                                     + cols[None, :, None] * sy_f + d[None, None, :] * sy_d, mask=col_load_ok,
                                     other=0.0)
                    grad_p += _dot_a(a, y_cols, SPLIT_BF16_DOT, COMPUTE)
                if TARGET_GRAD:
                    inv_p_cols = _div(one, _stats(p_norm_ptr, batch, cols, tokens, col_stat_ok, num_frames,
                                                  num_tokens), COMPUTE)
                    col_scale = _row_scale(grad_loss_ptr, batch, cols, col_ok & batch_ok, num_frames,
                                           num_tokens, COMPUTE)
                    a_back = _a_matrix(cols, rows, table_ptr, table_ptr + cols * num_slots, col_scale, inv_p_cols,
                                       inv_y, num_frames, near, far, num_slots, True, COMPUTE)
                    p_cols = tl.load(proj_ptr + batch * sp_b + tokens[:, None, None] * sp_n
                                     + cols[None, :, None] * sp_f + d[None, None, :] * sp_d, mask=col_load_ok,
                                     other=0.0)
                    grad_y += _dot_a(tl.trans(a_back, (0, 2, 1)), p_cols, SPLIT_BF16_DOT, COMPUTE)
        else:
            if SPLIT_BF16_DOT:
                grad_p = _dot_split(a_hi, a_lo, y)
            else:
                grad_p = tl.dot(a, y_wide, input_precision="ieee", out_dtype=COMPUTE)
            grad_p -= p_scale[:, :, None] * p_wide
            if TARGET_GRAD:
                if SPLIT_BF16_DOT:
                    grad_y = _dot_split(a_t_hi, a_t_lo, p)
                else:
                    grad_y = tl.dot(a_t, p_wide, input_precision="ieee", out_dtype=COMPUTE)
                grad_y -= y_scale[:, :, None] * y_wide
        if PROJ_GRAD:
            tl.store(gp_row + d[None, None, :] * gp_d, _to_element(grad_p, grad_proj_ptr), mask=write_ok & d_ok)
        if TARGET_GRAD:
            tl.store(gy_row + d[None, None, :] * gy_d, _to_element(grad_y, grad_target_ptr),
                     mask=write_ok & d_ok)

