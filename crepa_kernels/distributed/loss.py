"""``sequence_parallel_align_loss``: the CREPA loss of a sequence sharded across ranks (context parallelism)."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..backends import check_backend_name
from ..function import per_frame_loss_on
from ..spec import LossOptions, _check_num_frames, check_floating_tensor, compute_dtype, frames_view, reduce_frames
from .collectives import exchange_rows, replicated_input, sum_over_ranks
from .layout import SequenceLayout, any_halo, call_ranges, halo_exchange, plan_rank, piece_range
from .views import token_range_views




def sequence_parallel_align_loss(
    proj: torch.Tensor,
    target: torch.Tensor,
    *,
    num_frames: int,
    tau: float = 1.0,
    neighbors: int = 1,
    neighbor_mode: str = "adjacent",
    normalize_weights: bool = False,
    reduction: str = "mean",
    eps: float = 1e-12,
    weights: str | torch.Tensor = "exponential",
    backend: str = "auto",
    target_sharded: bool = False,
    seq_len: int | None = None,
    shard_sizes: list[int] | tuple[int, ...] | None = None,
    group=None,
) -> torch.Tensor:
    """``cross_frame_align_loss`` of a frame-major sequence [B, F*N, D] whose tokens are sharded across ranks.

    Args:
        proj: this rank's contiguous shard of the projected states, [B, S_local, D]; shards are in rank order, a
            frame may straddle ranks, and tokens past F*N (the end of the last shards) are padding and ignored.
            A DTensor sharded on dim 1 (Shard(1) on one mesh dimension) is used through its local tensor and
            the torch.chunk offsets DTensor uses; its mesh dimension is the group.
        target: the encoder features, either the whole sequence on every rank ([B, F, N, D] or [B, F*N, D], the
            default), or, with ``target_sharded=True`` (or a DTensor sharded like ``proj``), this rank's shard,
            shaped like ``proj``; ranks then exchange only the halo of neighbour frames they read.
        num_frames: F.
        tau, neighbors, neighbor_mode, normalize_weights, reduction, eps, weights, backend: as in
            cross_frame_align_loss.
        seq_len: F*N, needed only with a sharded target whose last shards carry padding (otherwise the sum of the
            shard sizes, or the replicated target's length).
        shard_sizes: tokens on each rank, padding included; default: every rank holds as many tokens as this one.
        group: a ProcessGroup or 1-D DeviceMesh; default the world. Not with a DTensor.

    Returns:
        The loss of the whole sequence, the same on every rank. Each rank's proj shard receives its slice of the
        single-process gradient; a target that requires grad receives its single-process gradient (the whole
        of it when replicated, this rank's slice when sharded).
    """
    options = LossOptions(tau=tau, neighbors=neighbors, neighbor_mode=neighbor_mode,
                          normalize_weights=normalize_weights, reduction=reduction, eps=eps, weights=weights)
    return sequence_parallel_loss(proj, target, options, num_frames=num_frames, backend=backend,
                                  target_sharded=target_sharded, seq_len=seq_len, shard_sizes=shard_sizes,
                                  group=group)


def sequence_parallel_loss(proj, target, options: LossOptions, *, num_frames: int, backend: str = "auto",
                           target_sharded: bool = False, seq_len: int | None = None, shard_sizes=None,
                           group=None) -> torch.Tensor:
    """sequence_parallel_align_loss with its loss options built and checked already (the regulariser's)."""
    check_backend_name(backend)
    if num_frames is None:
        raise ValueError("num_frames: expected a positive int (F, the frame count of the whole sequence), got None")
    _check_num_frames(num_frames)
    # clamped once, to the whole clip: the per-piece calls see fewer frames
    options = dataclasses.replace(options.for_frames(num_frames), clamp_neighbors=False)
    shard = _resolve_shard(proj, target, target_sharded, shard_sizes, group)
    layout, target_source = _layout_and_target(shard, num_frames, seq_len, options)

    plans = plan_rank(layout, shard.rank, options)
    dtype = compute_dtype(shard.proj, shard.target)
    proj_views = token_range_views(shard.proj, call_ranges(plans))
    partial = _local_partial(proj_views, target_source, plans, layout, options, backend, dtype, shard.proj)
    # An empty slice of a differentiable input the kernel calls do not read keeps it in this rank's graph (a rank
    # holding no real token still runs the backward collectives and gives proj its zero gradient). Not for a proj
    # the calls read: the empty slice's backward would zero-fill and add a full-size gradient.
    anchors = (*(() if proj_views else (shard.proj,)), *target_source.differentiable)
    for anchor in anchors:
        partial = partial + anchor.narrow(1, 0, 0).sum().to(dtype)
    return reduce_frames(sum_over_ranks(partial, shard.group_name), options.reduction)


class _Shard:
    """This rank's local tensors and where the group puts them."""

    def __init__(self, proj, target, target_sharded, shard_sizes, rank, group_name):
        self.proj, self.target, self.target_sharded = proj, target, target_sharded
        self.shard_sizes, self.rank, self.group_name = shard_sizes, rank, group_name


def _resolve_shard(proj, target, target_sharded, shard_sizes, group) -> _Shard:
    if not isinstance(target_sharded, bool):
        raise TypeError(f"target_sharded: expected a bool, got {type(target_sharded).__name__}")
    if isinstance(proj, DTensor):
        return _resolve_dtensor(proj, target, target_sharded, shard_sizes, group)
    if isinstance(target, DTensor):
        raise TypeError("target: a DTensor target needs a DTensor proj sharded on the same mesh, got a plain proj")
    _check_local("proj", proj)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel_align_loss: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    process_group = _process_group(group)
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    if shard_sizes is None:
        sizes = (proj.shape[1],) * world
    else:
        sizes = _check_shard_sizes(shard_sizes, world)
        if sizes[rank] != proj.shape[1]:
            raise ValueError(f"shard_sizes: rank {rank} holds {proj.shape[1]} tokens (proj.shape[1]), "
                             f"but shard_sizes[{rank}] is {sizes[rank]}")
    return _Shard(proj, target, target_sharded, sizes, rank, process_group.group_name)


def _process_group(group):
    if group is None:
        return dist.group.WORLD
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group: expected a 1-D DeviceMesh (pass mesh['cp'] for one dimension), got "
                             f"{group.ndim}-D mesh {tuple(group.shape)}")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"group: expected None, a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")


def _check_shard_sizes(shard_sizes, world: int) -> tuple[int, ...]:
    if not isinstance(shard_sizes, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shard_sizes
    ):
        raise TypeError(f"shard_sizes: expected a list of non-negative ints, one per rank, got {shard_sizes!r}")
    if len(shard_sizes) != world:
        raise ValueError(f"shard_sizes: expected one size per rank of the group ({world}), got {len(shard_sizes)}")
    return tuple(shard_sizes)


def _resolve_dtensor(proj, target, target_sharded, shard_sizes, group) -> _Shard:
    if group is not None or shard_sizes is not None:
        raise ValueError("group and shard_sizes: a DTensor proj carries its own mesh and sharding; pass neither")
    if proj.dim() != 3:
        raise ValueError(f"proj: expected a 3-D [B, S, D] DTensor, got shape {tuple(proj.shape)}")
    placements = proj.placements
    sequence_dims = [i for i, p in enumerate(placements) if type(p) is Shard and p.dim in (1, -2)]
    if len(sequence_dims) != 1:
        raise ValueError(f"proj: expected a DTensor sharded on the sequence dim (Shard(1)) over one mesh dimension, "
                         f"got placements {placements}")
    mesh_dim = sequence_dims[0]
    for i, p in enumerate(placements):
        if i != mesh_dim and not (isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0)):
            raise ValueError(f"proj: the mesh dimensions other than the sequence one may only replicate or shard the "
                             f"batch (Shard(0)), got placements {placements}")
    mesh = proj.device_mesh
    world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    sizes = tuple(int(Shard.local_shard_size_and_offset(proj.shape[1], world, r)[0]) for r in range(world))
    if isinstance(target, DTensor):
        if target.device_mesh != mesh:
            raise ValueError("target: expected a DTensor on the same DeviceMesh as proj")
        along = target.placements[mesh_dim]
        sharded = type(along) is Shard and along.dim in (1, -2)
        if not sharded and not isinstance(along, Replicate):
            raise ValueError(f"target: expected Shard(1) or Replicate on the sequence mesh dimension {mesh_dim}, "
                             f"got placements {target.placements}")
        if target_sharded and not sharded:
            raise ValueError(f"target_sharded=True but the target DTensor is not sharded on the sequence: "
                             f"{target.placements}")
        if sharded and tuple(target.placements) != tuple(placements):
            raise ValueError(f"target: a sharded target needs proj's placements {placements}, got {target.placements}")
        target, target_sharded = target.to_local(), sharded
    return _Shard(proj.to_local(), target, target_sharded, sizes, rank, mesh.get_group(mesh_dim).group_name)


def _check_local(name: str, x) -> None:
    check_floating_tensor(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name}: expected this rank's shard [B, S_local, D] (3-D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name}: expected non-empty batch and feature dims, got shape {tuple(x.shape)}")


def _layout_and_target(shard: _Shard, num_frames: int, seq_len, options: LossOptions):
    proj, target = shard.proj, shard.target
    _check_local("proj", proj)
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0):
        raise ValueError(f"seq_len: expected a positive int or None, got {seq_len!r}")
    if shard.target_sharded:
        _check_local("target", target)
        if target.shape != proj.shape:
            raise ValueError(f"target: a sharded target must be shaped like proj's shard {tuple(proj.shape)}, "
                             f"got {tuple(target.shape)}")
        total = seq_len if seq_len is not None else sum(shard.shard_sizes)
        if total % num_frames != 0:
            raise ValueError(f"seq_len: num_frames={num_frames} does not divide the sequence length {total}"
                             + ("" if seq_len is not None else " (the sum of the shard sizes; pass seq_len= if "
                                                             "the last shards carry padding)"))
        tokens = total // num_frames
    else:
        frames = frames_view("target", target, num_frames)
        tokens = frames.shape[2]
        if (frames.shape[0], frames.shape[3]) != (proj.shape[0], proj.shape[2]):
            raise ValueError(f"proj and target: expected the same batch and feature dims, got proj shard "
                             f"{tuple(proj.shape)} and target {tuple(target.shape)}")
        if seq_len is not None and seq_len != num_frames * tokens:
            raise ValueError(f"seq_len: the replicated target holds {num_frames * tokens} tokens, got {seq_len}")
    if proj.device != target.device:
        raise ValueError(f"proj and target: expected the same device, got {proj.device} and {target.device}")
    layout = SequenceLayout(num_frames, tokens, shard.shard_sizes)
    if sum(layout.shard_sizes) < layout.seq_len:
        raise ValueError(f"shard_sizes: the shards hold {sum(layout.shard_sizes)} tokens in all, fewer than the "
                         f"sequence's {layout.seq_len} (F={num_frames} x N={tokens})")
    if shard.target_sharded:
        return layout, _ShardedTarget(layout, shard.rank, target, options, shard.group_name)
    return layout, _ReplicatedTarget(replicated_input(frames, shard.group_name))


class _ReplicatedTarget:
    def __init__(self, frames: torch.Tensor):
        self.frames = frames
        self.differentiable = (frames,) if frames.requires_grad else ()

    def rows(self, piece, first: int, end: int, offset: int) -> torch.Tensor:
        return self.frames[:, first + offset : end + offset, piece.first_token : piece.end_token]


class _ShardedTarget:
    """This rank's target shard plus the halo rows the other ranks send it (one all_to_all_single)."""

    def __init__(self, layout: SequenceLayout, rank: int, target: torch.Tensor, options: LossOptions, group_name):
        self.layout = layout
        self.start, end = layout.shard_range(rank)
        self.local = target[:, : end - self.start]
        self.segments = [(self.start, end, self.local)]  # (first token, end token, [B, rows, D])
        self.differentiable = ()
        if not any_halo(layout, options):
            return
        exchange = halo_exchange(layout, rank, options)
        source = self.local if self.local.requires_grad else self.local.detach()
        send = [source[:, a - self.start : b - self.start] for ranges in exchange.send for a, b in ranges]
        send_rows = torch.cat(send, dim=1) if send else source[:, :0]
        received = exchange_rows(
            send_rows.transpose(0, 1),
            [sum(b - a for a, b in ranges) for ranges in exchange.send],
            [sum(b - a for a, b in ranges) for ranges in exchange.receive],
            group_name,
        )  # [rows, B, D]
        row = 0
        for a, b in (r for ranges in exchange.receive for r in ranges):
            self.segments.append((a, b, received[row : row + b - a].transpose(0, 1)))
            row += b - a
        self.differentiable = (received.transpose(0, 1),) if received.requires_grad else ()

    def rows(self, piece, first: int, end: int, offset: int) -> torch.Tensor:
        frames, tokens = end - first, piece.tokens
        if offset == 0:  # the same positions as the proj piece: this rank's own shard, as a view
            local = piece.local_start + (first - piece.first_frame) * tokens
            return self.local[:, local : local + frames * tokens].unflatten(1, (frames, tokens))
        n = self.layout.tokens_per_frame
        lo = (first + offset) * n + piece.first_token
        hi = (end - 1 + offset) * n + piece.end_token
        parts = [rows[:, max(lo, a) - a : min(hi, b) - a] for a, b, rows in sorted(self.segments, key=lambda s: s[0])
                 if max(lo, a) < min(hi, b)]
        gathered = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        assert gathered.shape[1] == hi - lo, "halo plan does not cover a term's target rows"
        return gathered.unflatten(1, (frames, tokens))


def _fused_loss(proj: torch.Tensor, target: torch.Tensor, options: LossOptions, backend: str) -> torch.Tensor:
    """The per-frame loss of one call on views, by the backend that runs this call (as cross_frame_align_loss)."""
    return per_frame_loss_on(backend, proj, target, options)


def _piece_loss(proj_views, target_source, plan, options: LossOptions, backend: str) -> torch.Tensor:
    """L[b, f] restricted to the piece's tokens (a mean over them), [B, frames of the piece]."""
    piece = plan.piece

    def proj_rows(first: int, end: int) -> torch.Tensor:
        return proj_views[piece_range(piece, first, end)].unflatten(1, (end - first, piece.tokens))

    fused = None
    if plan.fused:
        fused = _fused_loss(proj_rows(piece.first_frame, piece.end_frame),
                            target_source.rows(piece, piece.first_frame, piece.end_frame, 0), options, backend)
    repa_star = LossOptions(neighbors=0, eps=options.eps)
    terms_of_frame: dict[int, list[torch.Tensor]] = {}  # frame of the piece -> its [B, 1] single-offset terms
    for term in plan.terms:
        first = term.first_frame - piece.first_frame
        value = _fused_loss(
            proj_rows(term.first_frame, term.end_frame),
            target_source.rows(piece, term.first_frame, term.end_frame, term.offset),
            repa_star,
            backend,
        )
        for i in range(value.shape[1]):
            terms_of_frame.setdefault(first + i, []).append(term.coefficient * value[:, i : i + 1])
    columns, i = [], 0
    while i < len(plan.exact):
        if plan.exact[i]:  # a run of exact frames: the fused result as it is
            end = i
            while end < len(plan.exact) and plan.exact[end]:
                end += 1
            columns.append(fused[:, i:end])
            i = end
        else:  # the fused call's in-piece neighbours (without normalize_weights) plus the single-offset terms
            parts = [fused[:, i : i + 1]] if plan.fused_everywhere else []
            parts += terms_of_frame.get(i, [])
            columns.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0))
            i += 1
    return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)


def _local_partial(proj_views, target_source, plans, layout: SequenceLayout, options: LossOptions, backend: str,
                   dtype, proj) -> torch.Tensor:
    """This rank's share of the per-frame loss L[b, f], [B, F]: zero for the frames it holds no token of."""
    batch = proj.shape[0]
    columns, covered = [], 0
    for plan in plans:
        piece = plan.piece
        if piece.first_frame > covered:
            columns.append(proj.new_zeros((batch, piece.first_frame - covered), dtype=dtype))
        # the piece's mean over its tokens, weighted by its share of the frame's N tokens
        loss = _piece_loss(proj_views, target_source, plan, options, backend)
        columns.append(loss.to(dtype) * (piece.tokens / layout.tokens_per_frame))
        covered = piece.end_frame
    if covered < layout.num_frames:
        columns.append(proj.new_zeros((batch, layout.num_frames - covered), dtype=dtype))
    return torch.cat(columns, dim=1)
