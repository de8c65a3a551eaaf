"""Alignment diagnostics that the CREPA paper uses to motivate the loss: CKNNA, the cross-frame similarity matrix
and temporal smoothness.

They run every few training steps under no_grad, never on the hot path, so they favour exactness over speed: all
arithmetic is fp64 and every reduction has a fixed order (bitwise identical run to run). Memory stays bounded by
working in row blocks (CKNNA) or token blocks (similarity); none of them is differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import LossOptions, as_frames, check_floating_tensor, frames_view

# Elements per fp64 working block when chunk_size is None: 2**22 elements = 32 MiB.
BLOCK_ELEMENTS = 1 << 22
# Clamp for the norm of a pooled frame state, F.normalize's default convention.
POOLED_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1)


def _check_samples(name: str, x) -> None:
    check_floating_tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [n, d] tensor of n samples, got {x.dim()}-D shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected no empty dimension, got shape {tuple(x.shape)}")


def _check_cknna_inputs(a, b, topk, chunk_size) -> int:
    _check_samples("a", a)
    _check_samples("b", b)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"a and b: expected the same number of samples n, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b: expected the same device, got {a.device} and {b.device}")
    if n < 4:
        raise ValueError(f"a and b: the unbiased HSIC needs n >= 4 samples, got n = {n}")
    if not isinstance(topk, int) or isinstance(topk, bool):
        raise TypeError(f"topk: expected an int in [2, n - 1], got {type(topk).__name__} {topk!r}")
    # topk >= 2 as in the published metric; the diagonal is excluded, so at most n - 1 neighbours exist
    if not 2 <= topk <= n - 1:
        raise ValueError(f"topk: expected an int in [2, n - 1] = [2, {n - 1}], got {topk}")
    _check_chunk_size(chunk_size)
    return n




# ----------------------------------------------------------------------------------------------------------------
# CKNNA


def _neighbour_pass(a: torch.Tensor, b: torch.Tensor, topk: int, rows: int):
    """One pass over row blocks of K = a a^T and L = b b^T.

    Keeps, per sample i, its topk neighbours under each kernel (the diagonal excluded) with the kernel values there,
    and the column sums of the three masked kernels, which are the only dense (length-n) quantities HSIC needs.
    """
    n = a.shape[0]
    idx_k = torch.empty(n, topk, dtype=torch.int64, device=a.device)
    idx_l = torch.empty_like(idx_k)
    k_at_k = torch.empty(n, topk, dtype=torch.float64, device=a.device)  # K[i, idx_k[i]]
    l_at_k = torch.empty_like(k_at_k)  # L[i, idx_k[i]]
    l_at_l = torch.empty_like(k_at_k)  # L[i, idx_l[i]]
    shared = torch.empty(n, topk, dtype=torch.bool, device=a.device)  # idx_k[i, t] is also in idx_l[i]
    col_kk, col_ll, col_kl = (torch.zeros(n, dtype=torch.float64, device=a.device) for _ in range(3))

    for start in range(0, n, rows):
        block = slice(start, min(start + rows, n))
        kernel_k = a[block] @ a.T
        kernel_l = b[block] @ b.T
        # sample i is not its own neighbour
        kernel_k.diagonal(offset=start).fill_(float("-inf"))
        kernel_l.diagonal(offset=start).fill_(float("-inf"))
        k_at_k[block], idx_k[block] = kernel_k.topk(topk, dim=1)
        l_at_l[block], idx_l[block] = kernel_l.topk(topk, dim=1)
        l_at_k[block] = kernel_l.gather(1, idx_k[block])
        shared[block] = (idx_k[block, :, None] == idx_l[block, None, :]).any(dim=2)
        del kernel_l

        # Column sums through a dense scatter (indices are unique per row) rather than index_add_, whose CUDA
        # float atomics would make the result vary run to run. The kernel block is no longer needed: reuse it.
        for column_sum, index, values in (
            (col_kk, idx_k[block], k_at_k[block]),
            (col_kl, idx_k[block], k_at_k[block] * shared[block]),
            (col_ll, idx_l[block], l_at_l[block]),
        ):
            column_sum += kernel_k.zero_().scatter_(1, index, values).sum(dim=0)
    return idx_k, idx_l, k_at_k, l_at_k, l_at_l, shared, col_kk, col_ll, col_kl


def _points_back(idx_from: torch.Tensor, idx_to: torch.Tensor, rows: int) -> torch.Tensor:
    """[n, topk] bool: whether sample i is among idx_to[j]'s neighbours, for each neighbour j = idx_from[i, t]."""
    n = idx_from.shape[0]
    result = torch.empty_like(idx_from, dtype=torch.bool)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        samples = torch.arange(start, stop, device=idx_from.device)
        result[start:stop] = (idx_to[idx_from[start:stop]] == samples[:, None, None]).any(dim=2)
    return result


def _masked_hsic(x_values, y_values, transposed, column_sum_x, n: int) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012, Eq. 5) of X~ = M o K_x and Y~ = M o K_y, given sparsely.

    x_values, y_values: [n, topk], the entries of X~ and Y~ at the mask's non-zeros (zero where the mask is off);
    transposed: whether the mask is also on at the transposed position (j, i); column_sum_x: X~^T 1.
    The formula is (tr(X~ Y~) + 1^T X~ 1 1^T Y~ 1 / ((n-1)(n-2)) - 2 1^T X~ Y~ 1 / (n-2)) / (n (n-3)); with symmetric
    kernels tr(X~ Y~) = sum_ij M_ij M_ji K_x[i,j] K_y[i,j] and 1^T X~ Y~ 1 = (X~^T 1) . (Y~ 1).
    """
    trace = (x_values * y_values * transposed).sum()
    row_sum_y = y_values.sum(dim=1)
    total_x, total_y = x_values.sum(), row_sum_y.sum()
    cross = (column_sum_x * row_sum_y).sum()
    return (trace + total_x * total_y / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


@torch.no_grad()
def cknna(a: torch.Tensor, b: torch.Tensor, topk: int = 10, chunk_size: int | None = None) -> torch.Tensor:
    """Centered kernel nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    The metric of the authors' released code (minyoungg/platonic-rep, metrics.py, ``cknna`` with its defaults):
    with linear kernels K = a a^T and L = b b^T over the same n samples,
        M[i, j]  = 1 if i != j and j is among the topk largest K[i, :] and among the topk largest L[i, :]
                   (the diagonal is excluded from the candidates; M is not symmetric),
        align(K, L) = HSIC_unbiased(M o K, M o L)   (Song et al. 2012; zero diagonal, trace term tr(X~ Y~)),
        CKNNA    = align(K, L) / sqrt(align(K, K) align(L, L)),
    where align(K, K) uses K's own neighbour mask. Unlike the published code we add no 1e-6 to the denominator, so
    the value is exactly invariant to a global scale of either input. It is NaN when a self-alignment is <= 0.
    As published, it is not symmetric in (a, b): M is not symmetric, so the HSIC cross term 1^T (M o K)(M o L) 1
    depends on the order (pass projected states first, target features second).

    Known values: 1 for b = a, for b = a Q with Q orthogonal (or any isometry to a wider space) and for b = s a;
    about 0 for independent random a and b; with topk = n - 1 it is the unbiased linear CKA.

    Args:
        a: [n, d1] representations (e.g. projected DiT states, one row per token).
        b: [n, d2] representations of the same n samples (e.g. the encoder features); d2 may differ from d1.
        topk: neighbours per sample, 2 <= topk <= n - 1.
        chunk_size: rows of K and L computed at a time; None picks max(1, 2**22 // n).

    Returns:
        A 0-dim fp64 tensor (no .item() or data-dependent shapes inside, so no host synchronisation).

    Arithmetic is fp64. Accuracy alone would not need it (an fp32 variant differed by <= 2e-8 at n = 4096), but
    it shrinks the effect of how BLAS blocks the kernel rows to ~1e-16, so chunked and unchunked results agree to
    rounding and nearly tied neighbours rank the same way; the cost is small for a metric logged every K steps.
    Memory, for c = chunk_size rows per block: two fp64 kernel blocks, 16 c n bytes (at most 64 MiB by default
    for n <= 2**22); 44 n topk bytes of neighbour data; then, with the blocks freed, the neighbour-of-neighbour lookup,
    9 n topk^2 bytes (in blocks of at most 2**22 entries); and fp64 copies of inputs that are not fp64,
    8 n (d1 + d2) bytes. That is O(c n + n (topk^2 + d1 + d2)) rather than the O(n^2) of dense kernels. For
    n = 20,000 and topk = 10: 67 MB of kernel blocks + 8.8 MB of neighbour data (18 MB of lookup afterwards),
    plus 246 MB of fp64 copies if the inputs are fp32 with d1 = d2 = 768; one dense fp64 n x n kernel is 3.2 GB.
    """
    n = _check_cknna_inputs(a, b, topk, chunk_size)
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    rows = min(n, chunk_size or max(1, BLOCK_ELEMENTS // n))
    idx_k, idx_l, k_at_k, l_at_k, l_at_l, shared, col_kk, col_ll, col_kl = _neighbour_pass(a, b, topk, rows)

    lookup_rows = max(1, BLOCK_ELEMENTS // (topk * topk))
    back_k = _points_back(idx_k, idx_k, lookup_rows)  # M_K[j, i] for j = idx_k[i, t]
    back_l = _points_back(idx_l, idx_l, lookup_rows)  # M_L[j, i] for j = idx_l[i, t]
    back_kl = _points_back(idx_k, idx_l, lookup_rows)  # i in idx_l[j] for j = idx_k[i, t]

    align_kl = _masked_hsic(k_at_k * shared, l_at_k * shared, back_k & back_kl, col_kl, n)
    align_kk = _masked_hsic(k_at_k, k_at_k, back_k, col_kk, n)
    align_ll = _masked_hsic(l_at_l, l_at_l, back_l, col_ll, n)
    return align_kl / torch.sqrt(align_kk * align_ll)


# ----------------------------------------------------------------------------------------------------------------
# frame-level diagnostics


def _unit_frame_major(block: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, F, n, D] -> [F, B*n*D] fp64 copy with each token vector divided by max(|x|, eps)."""
    frame_major = block.transpose(0, 1).to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    norms = torch.linalg.vector_norm(frame_major, dim=-1, keepdim=True).clamp_min_(eps)
    return frame_major.div_(norms).flatten(1)


@torch.no_grad()
def cross_frame_similarity(
    proj: torch.Tensor,
    target: torch.Tensor,
    *,
    num_frames: int | None = None,
    eps: float = 1e-12,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """S[f, k] = mean over batch b and token n of cos(proj[b, f, n], target[b, k, n]), an [F, F] fp64 matrix.

    cos uses the loss's convention a.b / (max(|a|, eps) max(|b|, eps)), so the loss is a weighted band of S:
    cross_frame_align_loss(..., reduction="none").mean(0)[f] == -sum_k C[f][k] S[f, k] with
    C = LossOptions(...).frame_coefficients(F); in particular for neighbors=0 it is -S[f, f]. A REPA-style model
    only needs a bright diagonal; CREPA also rewards the off-diagonal band.

    Inputs are laid out as for cross_frame_align_loss ([B, F, N, D], or [B, F*N, D] with num_frames). Each input is
    read once, chunk_size tokens at a time (None: about 2**22 elements of each input per block): a block is
    normalised once into a frame-major fp64 copy and one [F, B*n*D] x [B*n*D, F] matmul contracts batch, token
    and feature dimensions together. Block results are summed in a fixed order.
    """
    LossOptions(eps=eps)  # validates eps
    _check_chunk_size(chunk_size)
    proj, target = as_frames(proj, target, num_frames)
    batch, frames, tokens, dim = proj.shape
    chunk = min(tokens, chunk_size or max(1, BLOCK_ELEMENTS // (batch * frames * dim)))

    total = torch.zeros(frames, frames, dtype=torch.float64, device=proj.device)
    for start in range(0, tokens, chunk):
        unit_proj = _unit_frame_major(proj[:, :, start : start + chunk], eps)
        unit_target = _unit_frame_major(target[:, :, start : start + chunk], eps)
        total += unit_proj @ unit_target.T
    return total / (batch * tokens)


@torch.no_grad()
def temporal_smoothness(states: torch.Tensor, *, num_frames: int | None = None) -> torch.Tensor:
    """Mean cosine between consecutive frames' token-mean-pooled states, a 0-dim fp64 tensor in [-1, 1].

    With m[b, f] = (1/N) sum_n states[b, f, n] (a D-vector),
        smoothness = 1 / (B (F - 1)) sum_b sum_{f=0}^{F-2} cos(m[b, f], m[b, f + 1]),
    cos(u, v) = u.v / (max(|u|, 1e-12) max(|v|, 1e-12)). 1 means every frame's pooled state points the same way as
    the next one's; it is invariant to a positive rescaling of any single frame. Needs F >= 2.

    states: [B, F, N, D], or [B, F*N, D] with num_frames (e.g. projected DiT states or encoder features).
    """
    frames = frames_view("states", states, num_frames)
    if frames.shape[1] < 2:
        raise ValueError(f"states: temporal smoothness needs at least 2 frames, got shape {tuple(frames.shape)}")
    pooled = F.normalize(frames.mean(dim=2, dtype=torch.float64), dim=-1, eps=POOLED_NORM_EPS)
    return (pooled[:, 1:] * pooled[:, :-1]).sum(dim=-1).mean()
