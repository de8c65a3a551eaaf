"""The token relation distillation loss as Triton kernels (backend "triton"; interface: ops/relation_reference.py).

Only the per-row clamped norms are precomputed (in torch). Then, with T = F N tokens per sample:

* loss kernel: one program per (sample, block of BLOCK_I rows i). It loops over every block of BLOCK_J keys j
  (for pairs="spatial" only the keys of its rows' frames), forms both relation tiles with tl.dot over D in
  BLOCK_D chunks (fp32 accumulation; 16-bit inputs enter tl.dot as they are, their products exact in fp32), scales
  them by the inverse norms, and sums a_j relu(|delta| - margin) over the counted pairs into per-row sums. The
  per-frame sums are a torch.sum over [B, F, N] in a fixed order.
* gradient kernel: one program per (sample, block of rows, chunk of BLOCK_DOUT output features). It recomputes
  both relation tiles over the whole of D for every key block (the price of keeping the [BLOCK_I, D] gradient
  accumulator out of registers: D / BLOCK_DOUT recomputations), forms C = g (w_i a_j + w_j a_i) (see
  csrc/crepa_relation_cpu.cpp for the formula) and accumulates C p^_J and -C y^_J for its chunk. The chain through
  the normalisation needs p^_i . u_i over all of D, which is sum_j C_ij (p^_i . p^_j): read off the tiles.

Each program owns its output rows and walks the keys in a fixed order: no atomics, bitwise deterministic.
For bf16 inputs the gradient product splits the fp32 coefficients as hi + lo bf16 matrices (two tensor-core dots,
~16 mantissa bits); fp16 and fp32 inputs use fp32 operands (fp16's range cannot hold the coefficients, which
carry grad_output / M). Under the Triton interpreter bf16 tiles are upcast first (the interpreter multiplies
bf16 dot operands as raw bits: triton-lang/triton#11584), as in triton_loss.
"""
from __future__ import annotations

import contextlib

import torch

from ..relation_spec import RelationOptions
from ..spec import compute_dtype
from .triton_loss import INTERPRETED, Launch, triton, unavailable_reason as _triton_unavailable_reason
from .triton_loss import _div  # x / y rounded to nearest ("/" compiles to the approximate div.full.f32)

if triton is not None:
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PAIR_CODES = {"all": 0, "spatial": 1, "temporal": 2}
NUM_STAGES = 2
# Tiles per kernel and operand path, chosen so that every kernel compiles without spills on sm_80/86/89/90
# (tools/compile_triton.py checks it): (BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_DOUT, num_warps). 16-bit operands take
# tensor-core dots; an fp32 operand takes IEEE fp32 dots on the FMA units, whose tiles need more registers, so its
# tiles are smaller. The gradient kernel also holds [BLOCK_I, BLOCK_DOUT] accumulators, and the bf16 coefficient
# split keeps its product on tensor cores; fp16 and fp32 gradients multiply in fp32 (see the module docstring).
LOSS_TILES = {True: (64, 64, 32, 0, 8), False: (32, 32, 32, 0, 8)}  # keyed by "every operand 16-bit"
GRAD_TILES = {True: (32, 64, 64, 128, 8), False: (16, 32, 32, 64, 8)}  # keyed by "bf16 coefficient split"


def unavailable_reason(device: torch.device) -> str | None:
    return _triton_unavailable_reason(device)


if triton is not None:
    @triton.jit
    def _relation_tiles(p_ptr, y_ptr, norm_p_ptr, norm_y_ptr, b, rows, keys, row_ok, key_ok, dim,
                        sp_b, sp_t, sp_d, sy_b, sy_t, sy_d, T,
                        P16: tl.constexpr, Y16: tl.constexpr, FP64: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """(p^_I p^_J^T, y^_I y^_J^T) as [BLOCK_I, BLOCK_J] tiles in the accumulation dtype."""
        acc_dtype = tl.float64 if FP64 else tl.float32
        sim_p = tl.zeros((BLOCK_I, BLOCK_J), dtype=acc_dtype)
        sim_y = tl.zeros((BLOCK_I, BLOCK_J), dtype=acc_dtype)
        base_p = p_ptr + b.to(tl.int64) * sp_b
        base_y = y_ptr + b.to(tl.int64) * sy_b
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < dim
            d64 = d.to(tl.int64)
            p_i = tl.load(base_p + rows[:, None] * sp_t + d64[None, :] * sp_d, mask=row_ok[:, None] & d_ok[None, :],
                          other=0.0)
            p_j = tl.load(base_p + keys[:, None] * sp_t + d64[None, :] * sp_d, mask=key_ok[:, None] & d_ok[None, :],
                          other=0.0)
            y_i = tl.load(base_y + rows[:, None] * sy_t + d64[None, :] * sy_d, mask=row_ok[:, None] & d_ok[None, :],
                          other=0.0)
            y_j = tl.load(base_y + keys[:, None] * sy_t + d64[None, :] * sy_d, mask=key_ok[:, None] & d_ok[None, :],
                          other=0.0)
            if P16:
                sim_p += tl.dot(p_i, tl.trans(p_j), out_dtype=tl.float32)
            else:
                sim_p += tl.dot(p_i.to(acc_dtype), tl.trans(p_j.to(acc_dtype)), input_precision="ieee")
            if Y16:
                sim_y += tl.dot(y_i, tl.trans(y_j), out_dtype=tl.float32)
            else:
                sim_y += tl.dot(y_i.to(acc_dtype), tl.trans(y_j.to(acc_dtype)), input_precision="ieee")
        row_off = b.to(tl.int64) * T + rows
        key_off = b.to(tl.int64) * T + keys
        inv_p_i = _div(1.0, tl.load(norm_p_ptr + row_off, mask=row_ok, other=1.0), acc_dtype)
        inv_p_j = _div(1.0, tl.load(norm_p_ptr + key_off, mask=key_ok, other=1.0), acc_dtype)
        inv_y_i = _div(1.0, tl.load(norm_y_ptr + row_off, mask=row_ok, other=1.0), acc_dtype)
        inv_y_j = _div(1.0, tl.load(norm_y_ptr + key_off, mask=key_ok, other=1.0), acc_dtype)
        sim_p = sim_p * inv_p_i[:, None] * inv_p_j[None, :]
        sim_y = sim_y * inv_y_i[:, None] * inv_y_j[None, :]
        return sim_p, sim_y, inv_p_j, inv_y_j

    @triton.jit
    def _key_range(i0, T, N, PAIRS: tl.constexpr, BLOCK_I: tl.constexpr):
        if PAIRS == 1:  # spatial: the frames of rows i0 .. i0 + BLOCK_I - 1 only
            last = tl.minimum(i0 + BLOCK_I, T) - 1
            return (i0 // N) * N, (last // N + 1) * N
        return i0 * 0, T

    @triton.jit
    def _relation_loss_kernel(p_ptr, y_ptr, norm_p_ptr, norm_y_ptr, a_ptr, row_loss_ptr, scalars_ptr,
                              T, N, dim,
                              sp_b, sp_t, sp_d, sy_b, sy_t, sy_d,
                              PAIRS: tl.constexpr, P16: tl.constexpr, Y16: tl.constexpr, FP64: tl.constexpr,
                              BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        blocks = tl.cdiv(T, BLOCK_I)
        pid = tl.program_id(0)
        b = pid // blocks
        i0 = (pid % blocks) * BLOCK_I
        rows = (i0 + tl.arange(0, BLOCK_I)).to(tl.int64)
        row_ok = rows < T
        row_frame = rows // N
        acc_dtype = tl.float64 if FP64 else tl.float32
        margin = tl.load(scalars_ptr).to(acc_dtype)  # fp64 host values, rounded once to the accumulation dtype
        loss = tl.zeros((BLOCK_I,), dtype=acc_dtype)
        j_begin, j_end = _key_range(i0, T, N, PAIRS, BLOCK_I)
        for j0 in range(j_begin, j_end, BLOCK_J):
            keys = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
            key_ok = keys < j_end
            sim_p, sim_y, _, _ = _relation_tiles(p_ptr, y_ptr, norm_p_ptr, norm_y_ptr, b, rows, keys, row_ok, key_ok,
                                                 dim, sp_b, sp_t, sp_d, sy_b, sy_t, sy_d, T, P16, Y16, FP64,
                                                 BLOCK_D, BLOCK_I, BLOCK_J)
            a_j = tl.load(a_ptr + keys, mask=key_ok, other=0.0)
            counted = row_ok[:, None] & key_ok[None, :] & (a_j[None, :] > 0)
            if PAIRS == 1:
                counted = counted & (row_frame[:, None] == (keys // N)[None, :])
            if PAIRS == 2:
                counted = counted & (row_frame[:, None] != (keys // N)[None, :])
            excess = tl.maximum(tl.abs(sim_p - sim_y) - margin, 0.0, propagate_nan=tl.PropagateNan.ALL)
            terms = excess * a_j[None, :]
            loss += tl.sum(tl.where(counted, terms, 0.0), axis=1)
        tl.store(row_loss_ptr + b.to(tl.int64) * T + rows, loss, mask=row_ok)

    @triton.jit
    def _relation_grad_kernel(p_ptr, y_ptr, norm_p_ptr, norm_y_ptr, a_ptr, w_ptr, gp_ptr, gy_ptr, scalars_ptr,
                              T, N, F, dim,
                              sp_b, sp_t, sp_d, sy_b, sy_t, sy_d,
                              PAIRS: tl.constexpr, P16: tl.constexpr, Y16: tl.constexpr, FP64: tl.constexpr,
                              SPLIT_P: tl.constexpr, SPLIT_Y: tl.constexpr, GRAD_P: tl.constexpr,
                              GRAD_Y: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr):
        blocks = tl.cdiv(T, BLOCK_I)
        pid = tl.program_id(0)
        b = pid // blocks
        i0 = (pid % blocks) * BLOCK_I
        rows = (i0 + tl.arange(0, BLOCK_I)).to(tl.int64)
        row_ok = rows < T
        row_frame = rows // N
        dout = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
        dout_ok = dout < dim
        dout64 = dout.to(tl.int64)
        acc_dtype = tl.float64 if FP64 else tl.float32
        margin = tl.load(scalars_ptr).to(acc_dtype)
        eps = tl.load(scalars_ptr + 1).to(acc_dtype)
        acc_p = tl.zeros((BLOCK_I, BLOCK_DOUT), dtype=acc_dtype)
        acc_y = tl.zeros((BLOCK_I, BLOCK_DOUT), dtype=acc_dtype)
        along_p = tl.zeros((BLOCK_I,), dtype=acc_dtype)  # p^_i . u_i
        along_y = tl.zeros((BLOCK_I,), dtype=acc_dtype)
        a_i = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
        w_i = tl.load(w_ptr + b.to(tl.int64) * F + row_frame, mask=row_ok, other=0.0)
        base_p = p_ptr + b.to(tl.int64) * sp_b
        base_y = y_ptr + b.to(tl.int64) * sy_b
        j_begin, j_end = _key_range(i0, T, N, PAIRS, BLOCK_I)
        for j0 in range(j_begin, j_end, BLOCK_J):
            keys = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
            key_ok = keys < j_end
            sim_p, sim_y, inv_p_j, inv_y_j = _relation_tiles(
                p_ptr, y_ptr, norm_p_ptr, norm_y_ptr, b, rows, keys, row_ok, key_ok, dim,
                sp_b, sp_t, sp_d, sy_b, sy_t, sy_d, T, P16, Y16, FP64, BLOCK_D, BLOCK_I, BLOCK_J)
            a_j = tl.load(a_ptr + keys, mask=key_ok, other=0.0)
            w_j = tl.load(w_ptr + b.to(tl.int64) * F + keys // N, mask=key_ok, other=0.0)
            weight = w_i[:, None] * a_j[None, :] + w_j[None, :] * a_i[:, None]
            counted = row_ok[:, None] & key_ok[None, :] & (weight != 0)
            if PAIRS == 1:
                counted = counted & (row_frame[:, None] == (keys // N)[None, :])
            if PAIRS == 2:
                counted = counted & (row_frame[:, None] != (keys // N)[None, :])
            delta = sim_p - sim_y
            # sign(delta) [|delta| > margin]; a NaN delta stays NaN
            sign = tl.where(delta > margin, 1.0, tl.where(delta < -margin, -1.0, 0.0))
            sign = tl.where(delta != delta, delta, sign)
            coefficient = tl.where(counted, weight * sign, 0.0)
            if GRAD_P:
                along_p += tl.sum(coefficient * sim_p, axis=1)
                c_p = coefficient * inv_p_j[None, :]  # p^_j = p_j / |p_j|: the scale goes on the coefficient
                p_j = tl.load(base_p + keys[:, None] * sp_t + dout64[None, :] * sp_d,
                              mask=key_ok[:, None] & dout_ok[None, :], other=0.0)
                if SPLIT_P:
                    hi = c_p.to(tl.bfloat16)
                    lo = (c_p - hi.to(tl.float32)).to(tl.bfloat16)
                    acc_p += tl.dot(hi, p_j, out_dtype=tl.float32) + tl.dot(lo, p_j, out_dtype=tl.float32)
                else:
                    acc_p += tl.dot(c_p, p_j.to(acc_dtype), input_precision="ieee")
            if GRAD_Y:
                along_y -= tl.sum(coefficient * sim_y, axis=1)
                c_y = coefficient * inv_y_j[None, :]
                y_j = tl.load(base_y + keys[:, None] * sy_t + dout64[None, :] * sy_d,
                              mask=key_ok[:, None] & dout_ok[None, :], other=0.0)
                if SPLIT_Y:
                    hi = c_y.to(tl.bfloat16)
                    lo = (c_y - hi.to(tl.float32)).to(tl.bfloat16)
                    acc_y -= tl.dot(hi, y_j, out_dtype=tl.float32) + tl.dot(lo, y_j, out_dtype=tl.float32)
                else:
                    acc_y -= tl.dot(c_y, y_j.to(acc_dtype), input_precision="ieee")
        # the chain through x^ = x / max(|x|, eps): (u - x^ (x^ . u)) / |x|, or u / eps where clamped
        out_off = (b.to(tl.int64) * T + rows)[:, None] * dim + dout64[None, :]
        out_mask = row_ok[:, None] & dout_ok[None, :]
        if GRAD_P:
            norm = tl.load(norm_p_ptr + b.to(tl.int64) * T + rows, mask=row_ok, other=1.0)
            inv = _div(1.0, norm, acc_dtype)
            p_i = tl.load(base_p + rows[:, None] * sp_t + dout64[None, :] * sp_d, mask=out_mask, other=0.0)
            unit = p_i.to(acc_dtype) * inv[:, None]
            clamped = norm <= eps
            grad = tl.where(clamped[:, None], acc_p, acc_p - unit * along_p[:, None]) * inv[:, None]
            tl.store(gp_ptr + out_off, grad, mask=out_mask)
        if GRAD_Y:
            norm = tl.load(norm_y_ptr + b.to(tl.int64) * T + rows, mask=row_ok, other=1.0)
            inv = _div(1.0, norm, acc_dtype)
            y_i = tl.load(base_y + rows[:, None] * sy_t + dout64[None, :] * sy_d, mask=out_mask, other=0.0)
            unit = y_i.to(acc_dtype) * inv[:, None]
            clamped = norm <= eps
            grad = tl.where(clamped[:, None], acc_y, acc_y - unit * along_y[:, None]) * inv[:, None]
            tl.store(gy_ptr + out_off, grad, mask=out_mask)


def _native_dot(dtype: torch.dtype) -> bool:
    """16-bit tiles enter tl.dot as they are, except bf16 under the interpreter (see module docstring)."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not INTERPRETED


def _clamped_norms(x: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """max(|x|, eps) per token, [B, T] in the accumulation dtype (the only precomputed quantity)."""
    norm = torch.linalg.vector_norm(x.to(dtype), dim=-1).flatten(1)
    return torch.where(norm > eps, norm, torch.full_like(norm, eps)).contiguous()


def _scalars(options: RelationOptions, device) -> torch.Tensor:
    """(margin, eps) as fp64 on the device: kernel arguments by pointer, so an fp64 call keeps their fp64 values
    (a Python float argument would reach the kernel as fp32)."""
    # two fills rather than torch.tensor([...], device=...), which copies from the host and waits for the stream
    return torch.stack([torch.full((), float(value), dtype=torch.float64, device=device)
                        for value in (options.margin, options.eps)])


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])  # a view when the strides allow


def _check_dtypes(proj, target) -> None:
    for name, x in (("proj", proj), ("target", target)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: the 'triton' backend takes {', '.join(map(str, SUPPORTED_DTYPES))}, got "
                            f"{x.dtype}")


def loss_launch(p, y, norm_p, norm_y, key_weight, row_loss, scalars, options: RelationOptions,
                tokens_per_frame: int) -> Launch:
    """The loss kernel's launch for [B, T, D] inputs (tools/compile_triton.py compiles the same)."""
    batch, tokens, dim = p.shape
    fp64 = row_loss.dtype == torch.float64
    args = (p, y, norm_p, norm_y, key_weight, row_loss, scalars, tokens, tokens_per_frame, dim,
            *p.stride(), *y.stride())
    native_p, native_y = _native_dot(p.dtype) and not fp64, _native_dot(y.dtype) and not fp64
    block_i, block_j, block_d, _, warps = LOSS_TILES[native_p and native_y]
    kwargs = dict(PAIRS=PAIR_CODES[options.pairs], P16=native_p, Y16=native_y, FP64=fp64, BLOCK_I=block_i,
                  BLOCK_J=block_j, BLOCK_D=block_d, num_warps=warps, num_stages=NUM_STAGES)
    return Launch(_relation_loss_kernel, (batch * triton.cdiv(tokens, block_i), 1, 1), args, kwargs)


def grad_launch(p, y, norm_p, norm_y, key_weight, frame_weight, grad_p, grad_y, scalars,
                options: RelationOptions, tokens_per_frame: int) -> Launch:
    """The gradient kernel's launch; grad_p / grad_y None when not wanted."""
    batch, tokens, dim = p.shape
    fp64 = norm_p.dtype == torch.float64
    some = grad_p if grad_p is not None else grad_y
    args = (p, y, norm_p, norm_y, key_weight, frame_weight, some if grad_p is None else grad_p,
            some if grad_y is None else grad_y, scalars, tokens, tokens_per_frame, frame_weight.shape[1], dim,
            *p.stride(), *y.stride())
    native_p, native_y = _native_dot(p.dtype) and not fp64, _native_dot(y.dtype) and not fp64
    split_p, split_y = p.dtype == torch.bfloat16 and native_p, y.dtype == torch.bfloat16 and native_y
    # the split path only where every gradient asked for takes it
    split = (grad_p is None or split_p) and (grad_y is None or split_y) and native_p and native_y
    block_i, block_j, block_d, block_dout, warps = GRAD_TILES[split]
    kwargs = dict(PAIRS=PAIR_CODES[options.pairs], P16=native_p, Y16=native_y, FP64=fp64, SPLIT_P=split_p,
                  SPLIT_Y=split_y, GRAD_P=grad_p is not None, GRAD_Y=grad_y is not None, BLOCK_I=block_i,
                  BLOCK_J=block_j, BLOCK_D=block_d, BLOCK_DOUT=block_dout, num_warps=warps, num_stages=NUM_STAGES)
    grid = (batch * triton.cdiv(tokens, block_i), triton.cdiv(dim, block_dout), 1)
    return Launch(_relation_grad_kernel, grid, args, kwargs)


def _run(launch: Launch, device: torch.device) -> None:
    """Launches on the inputs' device (its current stream)."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)


def _poisoned(shape, dtype, device) -> torch.Tensor:
    """Output buffers start as NaN: an element a kernel forgot to write shows."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def forward(proj, target, key_weight, options: RelationOptions, grad_proj: bool = False, grad_target: bool = False):
    """(L [B, F], grad_proj | None, grad_target | None); the gradients are those of L.sum(), by the gradient
    kernel right after the loss kernel."""
    _check_dtypes(proj, target)
    batch, frames, tokens_per_frame, _ = proj.shape
    dtype = compute_dtype(proj, target)
    p, y = _rows(proj), _rows(target)
    norm_p, norm_y = _clamped_norms(proj, options.eps, dtype), _clamped_norms(target, options.eps, dtype)
    weight = key_weight.to(device=proj.device, dtype=dtype).contiguous()
    scalars = _scalars(options, proj.device)
    row_loss = _poisoned(norm_p.shape, dtype, proj.device)
    _run(loss_launch(p, y, norm_p, norm_y, weight, row_loss, scalars, options, tokens_per_frame), proj.device)
    per_frame = row_loss.view(batch, frames, tokens_per_frame).sum(dim=-1)
    grads = (None, None)
    if grad_proj or grad_target:
        ones = torch.ones(batch, frames, dtype=dtype, device=proj.device)
        grads = _gradients(p, y, norm_p, norm_y, weight, ones, scalars, options, tokens_per_frame, proj, target,
                           grad_proj, grad_target)
    return (per_frame, *grads)


def _gradients(p, y, norm_p, norm_y, weight, frame_weight, scalars, options, tokens_per_frame, proj, target,
               grad_proj, grad_target):
    gp = _poisoned(p.shape, norm_p.dtype, p.device) if grad_proj else None
    gy = _poisoned(y.shape, norm_p.dtype, p.device) if grad_target else None
    _run(grad_launch(p, y, norm_p, norm_y, weight, frame_weight, gp, gy, scalars, options, tokens_per_frame),
         p.device)
    return (None if gp is None else gp.view(proj.shape).to(proj.dtype),
            None if gy is None else gy.view(target.shape).to(target.dtype))


def backward(frame_weight, proj, target, key_weight, options: RelationOptions, needs_proj_grad: bool,
             needs_target_grad: bool):
    """The gradients of (frame_weight * L).sum()."""
    _check_dtypes(proj, target)
    dtype = compute_dtype(proj, target)
    p, y = _rows(proj), _rows(target)
    norm_p, norm_y = _clamped_norms(proj, options.eps, dtype), _clamped_norms(target, options.eps, dtype)
    weight = key_weight.to(device=proj.device, dtype=dtype).contiguous()
    return _gradients(p, y, norm_p, norm_y, weight, frame_weight.to(dtype).contiguous(), _scalars(options, p.device),
                      options, proj.shape[2], proj, target, needs_proj_grad, needs_target_grad)
