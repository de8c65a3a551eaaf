"""The CREPA regulariser: projector(s) h_phi + cross-frame alignment loss + cheap logging figures.

One alignment term per (captured layer, teacher): the hidden states of each captured block, projected by that
pair's projector (or one projector per teacher shared by all layers), against each teacher's targets (the features
of one frozen encoder on the DiT's token grid). The alignment loss is the weighted mean of the terms, each logged
on its own. Per-sample weights, frame masks and their reduction are described in :mod:`.weighting`, the weight
lambda over training in :mod:`.schedule`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..function import per_frame_loss_on
from ..backends import check_backend_name
from ..spec import LossOptions
from .projector import build_projector
from .schedule import LambdaSchedule
from .token_grid import pick_frames, resample_token_grid, resample_tokens, spatial_normalize
from .weighting import check_weights, reduce_weighted


@dataclass
class AlignmentOutput:
    loss: torch.Tensor  # lambda * alignment loss: add it to the diffusion loss (see `computed` for lambda = 0)
    align_loss: torch.Tensor | None  # the alignment loss before lambda, detached; None when not computed
    self_similarity: torch.Tensor | None  # mean of cos(p_f, y_f) over included frames and tokens, 0-dim, detached
    # weighted mean of cos(p_f, y_k) over the neighbour pairs k in K(f) of included frames f, weights w(|k - f|)
    # (a plain mean in "adjacent" mode); None when no frame has a neighbour or nothing was computed
    neighbor_similarity: torch.Tensor | None
    projected: torch.Tensor | None = field(default=None, repr=False)  # first term's h_phi(states), [B, F, N, D]
    weight: float = 0.0  # lambda of this step
    included_frames: torch.Tensor | None = None  # how many (video, frame) pairs the loss includes, on this rank
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # per "layer/teacher": its alignment loss
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)  # everything above to log, and the schedule
    # what the schedule's similarity cutoff watches (see CrepaRegularizer's similarity_signal), 0-dim, detached
    cutoff_similarity: torch.Tensor | None = None
    observed: bool = False  # the forward already folded cutoff_similarity into the schedule (cutoff_timing="same_step")
    nonfinite: bool = False  # the alignment loss was not finite and was left out (skip_nonfinite=True)

    @property
    def computed(self) -> bool:
        """False when nothing was projected or computed (lambda was 0 and no similarity was watched). When
        ``loss`` adds nothing (not computed, lambda 0, or a skipped non-finite loss) it is a zero that only ties the
        projector's parameters into the graph (so DDP sees them used and syncs zero gradients)."""
        return self.align_loss is not None


class CrepaRegularizer(nn.Module):
    """lambda * CREPA(h_phi(hidden states), encoder targets), arXiv 2506.09229.

    Loss options as in :func:`crepa_kernels.cross_frame_align_loss`. ``loss_weight`` is the paper's lambda: a
    number, or a :class:`LambdaSchedule` (call :meth:`end_step` once per optimizer step to advance it).

    Several layers and teachers: ``num_layers`` captured blocks (``hidden_states`` is then a list) and one
    ``encoder_dim`` per teacher (``targets`` is then a list); a projector per (layer, teacher), or with
    ``share_projector`` one per teacher used for every layer. The alignment loss is the mean of the terms weighted
    by ``layer_weights[l] * teacher_weights[t]``. ``projector``: "mlp" (REPA's) or "linear" (LayerNorm + Linear).
    ``checkpoint_projector`` recomputes the projector's activations in the backward instead of keeping them.

    The figures cost one extra forward-only pass of the fused loss with ``neighbors=0`` per term (no backward,
    nothing saved; none at all without neighbours): the self term S[b, f] comes from it and the neighbour term
    from the [B, F] loss already computed, -L[b, f] * Z_f - S[b, f].

    Upstream trainers' conventions (docs/porting.md):

    * ``clamp_neighbors=True``: d = min(neighbors, F - 1) on each call, as SimpleTuner and takenoko do.
    * ``similarity_signal``: what the schedule's similarity cutoff watches, a mean over the included frames of
      "self": cos(p_f, y_f) (this library's); "total": the neighbour-weighted total similarity -L[b, f], divided by
      Z_f only under ``normalize_weights`` (SimpleTuner's ``crepa_similarity``); "normalized": the weight-normalised
      alignment -L[b, f] / sum_k C[f, k] (musubi-tuner's alignment score).
    * ``skip_nonfinite=True``: a step whose alignment loss is not finite adds nothing (its ``loss`` is a zero tied
      to the projectors) and is counted in ``nonfinite_steps``, as musubi-tuner's LTX-2 and minimax-h3 trainers do.
      One host sync per forward.
    * ``frame_align="pick"``: when the hidden states and the targets have different frame counts, the larger side's
      frames are picked at linspace(0, F - 1, F_smaller) (SimpleTuner; musubi-tuner picks the targets' the same
      way). The hidden states' frame count comes from their shape [B, F, N, hidden] or from ``forward(...,
      hidden_frames=F)``. ``sample_weight`` and ``frame_mask`` then refer to the smaller frame count.
    * ``token_align="linear"``: the projected states are resampled to the targets' token count by 1-D linear
      interpolation of each frame's token sequence (musubi-tuner's dino mode, minimax-h3); ``"to_smaller"``: both
      sides to the smaller count, bilinear when both counts are squares, else 1-D (SimpleTuner).
    * ``pool_tokens=True``: each frame's tokens averaged on both sides after the projector, N = 1 (musubi-tuner's
      backbone mode, SimpleTuner's ``crepa_spatial_align=False`` when the token counts differ).
    * iREPA: ``target_norm="spatial"`` spatially normalises the targets as given (per frame and channel over the
      tokens, :func:`~crepa_kernels.training.token_grid.spatial_normalize` with ``spatial_norm_gamma``), and
      ``projector="conv", projector_grid=(h, w)`` projects with a 3 x 3 convolution over each frame's token grid.
    """

    def __init__(
        self,
        hidden_dim: int,
        encoder_dim: int | Sequence[int],
        *,
        loss_weight: float | LambdaSchedule = 0.5,
        tau: float = 1.0,
        neighbors: int = 1,
        neighbor_mode: str = "adjacent",
        normalize_weights: bool = False,
        weights: str | torch.Tensor = "exponential",
        reduction: str = "mean",
        eps: float = 1e-12,
        backend: str = "auto",
        projector: str = "mlp",
        projector_width: int = 2048,
        projector_depth: int = 3,
        checkpoint_projector: bool = False,
        num_layers: int = 1,
        share_projector: bool = False,
        layer_weights: Sequence[float] | None = None,
        teacher_weights: Sequence[float] | None = None,
        layer_names: Sequence[str] | None = None,
        teacher_names: Sequence[str] | None = None,
        clamp_neighbors: bool = False,
        similarity_signal: str = "self",
        skip_nonfinite: bool = False,
        frame_align: str = "exact",
        token_align: str = "exact",
        pool_tokens: bool = False,
        target_norm: str = "none",
        spatial_norm_gamma: float = 1.0,
        projector_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if frame_align not in FRAME_ALIGNS:
            raise ValueError(f"frame_align: expected one of {FRAME_ALIGNS}, got {frame_align!r}")
        if token_align not in TOKEN_ALIGNS:
            raise ValueError(f"token_align: expected one of {TOKEN_ALIGNS}, got {token_align!r}")
        if not isinstance(pool_tokens, bool):
            raise TypeError(f"pool_tokens: expected a bool, got {type(pool_tokens).__name__} {pool_tokens!r}")
        self.frame_align, self.token_align, self.pool_tokens = frame_align, token_align, pool_tokens
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm: expected one of {TARGET_NORMS}, got {target_norm!r}")
        if not isinstance(spatial_norm_gamma, (int, float)) or not math.isfinite(spatial_norm_gamma):
            raise ValueError(f"spatial_norm_gamma: expected a finite number, got {spatial_norm_gamma!r}")
        self.target_norm, self.spatial_norm_gamma = target_norm, float(spatial_norm_gamma)
        if similarity_signal not in SIMILARITY_SIGNALS:
            raise ValueError(f"similarity_signal: expected one of {SIMILARITY_SIGNALS}, got {similarity_signal!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite: expected a bool, got {type(skip_nonfinite).__name__} {skip_nonfinite!r}")
        self.clamp_neighbors, self.similarity_signal, self.skip_nonfinite = (clamp_neighbors, similarity_signal,
                                                                             skip_nonfinite)
        self.nonfinite_steps = 0  # forwards whose non-finite alignment loss was skipped (skip_nonfinite=True)
        self.encoder_dims = [encoder_dim] if isinstance(encoder_dim, int) else list(encoder_dim)
        if not self.encoder_dims:
            raise ValueError("encoder_dim: expected an int or a non-empty sequence of ints, got an empty sequence")
        if num_layers < 1:
            raise ValueError(f"num_layers: expected at least 1, got {num_layers}")
        self.num_layers = num_layers
        self.layer_weights = _weights("layer_weights", layer_weights, num_layers)
        self.teacher_weights = _weights("teacher_weights", teacher_weights, len(self.encoder_dims))
        self.layer_names = _names("layer_names", layer_names, num_layers, "layer")
        self.teacher_names = _names("teacher_names", teacher_names, len(self.encoder_dims), "teacher")
        self.share_projector = share_projector
        copies = 1 if share_projector else num_layers  # projector index: l * teachers + t, or t when shared
        self.projectors = nn.ModuleList(
            build_projector(hidden_dim, dim, kind=projector, width=projector_width, depth=projector_depth,
                            grid=projector_grid)
            for _ in range(copies) for dim in self.encoder_dims)
        self.checkpoint_projector = checkpoint_projector
        self.options = LossOptions(
            tau=tau, neighbors=neighbors, neighbor_mode=neighbor_mode, normalize_weights=normalize_weights,
            reduction=reduction, eps=eps, clamp_neighbors=clamp_neighbors, weights=weights,
        )
        check_backend_name(backend)
        self.backend = backend
        if isinstance(loss_weight, LambdaSchedule):
            self.schedule = loss_weight
        else:
            self.schedule = LambdaSchedule(float(loss_weight))

    @property
    def projector(self) -> nn.Module:
        """The projector, when there is only one (one layer, one teacher)."""
        if len(self.projectors) != 1:
            # not AttributeError: nn.Module.__getattr__ would replace this message with a generic one
            raise RuntimeError(f"this regulariser has {len(self.projectors)} projectors: use .projectors or "
                               ".projector_for(layer, teacher)")
        return self.projectors[0]

    def projector_for(self, layer: int, teacher: int) -> nn.Module:
        return self.projectors[teacher if self.share_projector else layer * len(self.encoder_dims) + teacher]

    @property
    def loss_weight(self) -> float:
        """lambda for the current step."""
        return self.schedule.value()

    @property
    def active(self) -> bool:
        """Whether forward computes anything this step: lambda > 0, or the schedule watches the similarity (a
        recoverable cutoff, ``similarity_every_step``). When not, the targets are not needed."""
        return self.schedule.computes

    def options_for(self, frames: int) -> LossOptions:
        """The loss options of a clip of ``frames`` frames: ``neighbors`` clamped to frames - 1 under
        ``clamp_neighbors``."""
        return self.options.for_frames(frames)

    def extra_repr(self) -> str:
        return (f"backend={self.backend!r}, {self.options}, layers={self.layer_names}, teachers={self.teacher_names}, "
                f"checkpoint_projector={self.checkpoint_projector}, clamp_neighbors={self.clamp_neighbors}, "
                f"similarity_signal={self.similarity_signal!r}, skip_nonfinite={self.skip_nonfinite}, "
                f"frame_align={self.frame_align!r}, token_align={self.token_align!r}, pool_tokens={self.pool_tokens}, "
                f"target_norm={self.target_norm!r}, spatial_norm_gamma={self.spatial_norm_gamma}, "
                f"schedule={self.schedule}")

    def end_step(self, alignment: AlignmentOutput | Sequence[AlignmentOutput]) -> None:
        """Advance the schedule after the optimizer step, feeding it this step's similarity (collective when a
        similarity threshold is watched: call it on every rank). With gradient accumulation pass the alignments
        of all the step's micro-batches: the schedule then sees their similarity over all the frames they
        included, not the last micro-batch's alone."""
        alignments = [alignment] if isinstance(alignment, AlignmentOutput) else list(alignment)
        # a skipped non-finite step counts no frame (with cutoff_timing="same_step" the schedule ignores these:
        # each forward folded its own similarity in already)
        computed = [a for a in alignments if a.computed]
        if not computed:
            self.schedule.step()
            return
        counts = torch.stack([a.included_frames for a in computed])
        # a micro-batch that included no frame has a NaN similarity and adds nothing
        similarities = torch.stack([a.cutoff_similarity.double() for a in computed]).where(counts > 0, 0.0)
        total = counts.sum()
        self.schedule.step((similarities * counts).sum() / total.clamp(min=1), total)

    def _per_frame_loss(self, proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> torch.Tensor:
        """L [B, F] of [B, F, N, D] inputs under ``options`` (already clamped to the clip by options_for)."""
        return per_frame_loss_on(self.backend, proj, target, options)

    def _project(self, projector: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_projector and torch.is_grad_enabled():
            return checkpoint(projector, hidden_states, use_reentrant=False)
        return projector(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor | Sequence[torch.Tensor],
        targets: torch.Tensor | Sequence[torch.Tensor],
        *,
        sample_weight: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        update_cutoff: bool = True,
        hidden_frames: int | None = None,
    ) -> AlignmentOutput:
        """hidden_states: per captured layer [B, F*N, hidden_dim] frame-major (as a DiT block emits them) or
        [B, F, N, hidden_dim]; targets: per teacher, encoder features on the same token grid, [B, F, N, dim_t]
        (see token_grid). A single tensor stands for a list of one. sample_weight [B] and frame_mask [B, F] (bool,
        True = in the loss) as in :mod:`.weighting`. ``update_cutoff=False`` (a validation pass): with
        ``cutoff_timing="same_step"``, this forward does not fold its similarity into the schedule's EMA.
        ``hidden_frames``: the frame count of 3-D hidden states [B, F_h * N_h, hidden] whose grid differs from the
        targets' (with ``frame_align`` / ``token_align``); default: the targets' grid."""
        weight = self.loss_weight
        if not self.schedule.computes:
            return self.skipped_output()
        same_step = (self.schedule.cutoff_timing == "same_step" and update_cutoff
                     and self.schedule.needs_similarity)
        # lambda is 0 and stays 0 whatever this similarity (next-step timing, or a shape value of 0): forward only.
        # With same-step timing a recoverable cutoff may lift on this very forward, which then needs its graph.
        needs_graph = weight > 0.0 or (same_step and self.schedule.value_at(self.schedule.steps_done) > 0.0)
        with contextlib.nullcontext() if needs_graph else torch.no_grad():
            output = self._aligned(hidden_states, targets, sample_weight, frame_mask, hidden_frames)
        if same_step:
            similarity = output.cutoff_similarity
            count = output.included_frames
            if output.nonfinite:  # no similarity to give; still a collective every rank joins
                similarity, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
            self.schedule.observe(similarity, count)
            output.observed = True
            weight = self.loss_weight  # 0 when this very similarity crossed the threshold
        if weight == 0.0 or output.nonfinite:
            output.loss, output.weight = self._zero_loss(), 0.0
        else:
            output.loss, output.weight = weight * output.loss, weight
        output.logs.update(self.schedule.metrics())
        return output

    def _aligned(self, hidden_states, targets, sample_weight, frame_mask, hidden_frames) -> AlignmentOutput:
        """The alignment of one forward, its ``loss`` before lambda (``weight`` is set by forward)."""
        layers = _as_list("hidden_states", hidden_states, self.num_layers, "captured layers")
        teachers = _as_list("targets", targets, len(self.encoder_dims), "teachers")
        for t, (target, dim) in enumerate(zip(teachers, self.encoder_dims)):
            if target.dim() != 4 or target.shape[-1] != dim:
                raise ValueError(f"targets[{t}]: expected [B, F, N, {dim}], got shape {tuple(target.shape)}")
            if target.shape[:3] != teachers[0].shape[:3]:
                raise ValueError(f"targets[{t}]: every teacher needs the same [B, F, N] grid, got "
                                 f"{tuple(target.shape[:3])} and {tuple(teachers[0].shape[:3])}")
        if self.target_norm == "spatial":
            teachers = [spatial_normalize(target, self.spatial_norm_gamma) for target in teachers]
        batch, frames, tokens, _ = teachers[0].shape
        grid = self._hidden_grid(layers[0], frames, tokens, hidden_frames)
        if self.frame_align == "pick":
            frames = min(frames, grid[0])
        check_weights(torch.Size((batch, frames)), sample_weight, frame_mask, teachers[0].device)
        options = self.options_for(frames)

        term_losses, term_self, term_neighbor, term_signal, term_weights, terms, logs = [], [], [], [], [], {}, {}
        projected = None
        for l, hidden in enumerate(layers):
            for t, target in enumerate(teachers):
                proj = self._project(self.projector_for(l, t), hidden)
                if proj.dim() == 3:
                    if proj.shape[1] != grid[0] * grid[1]:
                        raise ValueError(f"hidden_states[{l}]: {proj.shape[1]} tokens, the grid has "
                                         f"{grid[0]} frames x {grid[1]} tokens")
                    proj = proj.unflatten(1, grid)
                proj, target = self._align_grids(proj, target)
                projected = proj if projected is None else projected
                per_frame = self._per_frame_loss(proj, target, options)
                term_loss = reduce_weighted(per_frame, options.reduction, sample_weight, frame_mask)
                self_sim, neighbor_sim, signal = self._figures(proj, target, per_frame.detach(), frame_mask, options)
                name = f"{self.layer_names[l]}/{self.teacher_names[t]}"
                terms[name] = term_loss.detach()
                term_losses.append(term_loss)
                term_self.append(self_sim)
                term_neighbor.append(neighbor_sim)
                term_signal.append(signal)
                term_weights.append(self.layer_weights[l] * self.teacher_weights[t])

        total = sum(term_weights)
        align_loss = sum(w * loss for w, loss in zip(term_weights, term_losses)) / total
        self_similarity = sum(w * s for w, s in zip(term_weights, term_self)) / total
        neighbor_similarity = (None if term_neighbor[0] is None else
                               sum(w * s for w, s in zip(term_weights, term_neighbor)) / total)
        cutoff_similarity = sum(w * s for w, s in zip(term_weights, term_signal)) / total
        nonfinite = False
        if self.skip_nonfinite and not bool(torch.isfinite(align_loss.detach())):  # host sync, as upstream
            self.nonfinite_steps += 1
            nonfinite = True
        included = (frame_mask.sum() if frame_mask is not None else
                    torch.tensor(batch * frames, device=teachers[0].device)).to(torch.float64)
        logs.update(align_loss=align_loss.detach(), self_similarity=self_similarity, included_frames=included,
                    cutoff_similarity=cutoff_similarity)
        if self.skip_nonfinite:
            logs["nonfinite_steps"] = float(self.nonfinite_steps)
        if neighbor_similarity is not None:
            logs["neighbor_similarity"] = neighbor_similarity
        if len(terms) > 1:
            for (name, loss), s in zip(terms.items(), term_self):
                logs[f"align_loss/{name}"] = loss
                logs[f"self_similarity/{name}"] = s
        return AlignmentOutput(
            loss=align_loss, align_loss=align_loss.detach(), self_similarity=self_similarity,
            neighbor_similarity=neighbor_similarity, projected=projected,
            included_frames=included.new_zeros(()) if nonfinite else included, terms=terms, logs=logs,
            cutoff_similarity=cutoff_similarity, nonfinite=nonfinite,
        )

    def _hidden_grid(self, hidden, frames, tokens, hidden_frames) -> tuple[int, int]:
        """(frames, tokens) of the hidden states: from a 4-D shape, from ``hidden_frames``, else the targets'."""
        if hidden.dim() == 4:
            return hidden.shape[1], hidden.shape[2]
        if hidden_frames is None:
            return frames, tokens
        if not isinstance(hidden_frames, int) or hidden_frames < 1 or hidden.shape[1] % hidden_frames:
            raise ValueError(f"hidden_frames: expected a positive int dividing the {hidden.shape[1]} tokens of the "
                             f"hidden states, got {hidden_frames!r}")
        return hidden_frames, hidden.shape[1] // hidden_frames

    def _align_grids(self, proj: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frame_align and token_align applied to one (projection, target) pair, both [B, F, N, D]."""
        if self.frame_align == "pick" and proj.shape[1] != target.shape[1]:
            frames = min(proj.shape[1], target.shape[1])
            proj, target = pick_frames(proj, frames), pick_frames(target, frames)
        if self.token_align == "linear":
            proj = resample_tokens(proj, target.shape[2])
        elif self.token_align == "to_smaller" and proj.shape[2] != target.shape[2]:
            tokens = min(proj.shape[2], target.shape[2])
            proj, target = resample_token_grid(proj, tokens), resample_token_grid(target, tokens)
        if self.pool_tokens:
            proj, target = proj.mean(dim=2, keepdim=True), target.mean(dim=2, keepdim=True)
        return proj, target

    def _zero_loss(self) -> torch.Tensor:
        """A zero tied to the projectors' parameters, so a data-parallel wrapper sees them used."""
        params = [p for p in self.parameters() if p.requires_grad]
        return sum(p.reshape(-1)[0] for p in params) * 0.0 if params else torch.zeros(())

    def skipped_output(self) -> AlignmentOutput:
        """The output of a step where nothing is computed (lambda = 0, no similarity watched); the loss is a zero
        tied to the projectors' parameters."""
        return AlignmentOutput(loss=self._zero_loss(), align_loss=None, self_similarity=None,
                               neighbor_similarity=None, weight=0.0, logs=self.schedule.metrics())

    @torch.no_grad()
    def _figures(self, proj, target, per_frame, frame_mask, options):
        """(self similarity, neighbour similarity or None, the similarity_signal), each 0-dim."""
        frames = per_frame.shape[1]
        included = (torch.ones_like(per_frame) if frame_mask is None else frame_mask.to(per_frame.dtype))

        def mean(values):
            return (values * included).sum() / included.sum()

        coefficients = options.frame_coefficients(frames)
        if self.similarity_signal == "total":
            signal = mean(-per_frame)
        elif self.similarity_signal == "normalized":
            row_sums = torch.tensor([sum(row) for row in coefficients], dtype=per_frame.dtype)
            signal = mean(-per_frame / row_sums.to(per_frame.device, non_blocking=True))
        if not options.offsets(frames):  # no neighbours: the loss is the self term alone, Z_f = 1
            self_similarity = mean(-per_frame)
            return self_similarity, None, self_similarity if self.similarity_signal == "self" else signal
        self_terms = -self._per_frame_loss(proj, target, LossOptions(neighbors=0, eps=options.eps))  # mean_n cos(p_f, y_f), [B, F]
        # C[f][f] = 1 / Z_f, C[f][k] = w / Z_f: per frame, Z_f and the total neighbour weight (host constants)
        z = [1.0 / row[f] for f, row in enumerate(coefficients)]
        neighbour_weight = [(sum(row) - row[f]) * z[f] for f, row in enumerate(coefficients)]
        z, neighbour_weight = (torch.tensor(v, dtype=per_frame.dtype).to(per_frame.device, non_blocking=True)
                               for v in (z, neighbour_weight))
        neighbour_terms = -per_frame * z - self_terms  # sum_k w(|k-f|) mean_n cos(p_f, y_k), [B, F]
        self_similarity = mean(self_terms)
        return (self_similarity, (neighbour_terms * included).sum() / (included * neighbour_weight).sum(),
                self_similarity if self.similarity_signal == "self" else signal)


SIMILARITY_SIGNALS = ("self", "total", "normalized")
FRAME_ALIGNS = ("exact", "pick")
TARGET_NORMS = ("none", "spatial")
TOKEN_ALIGNS = ("exact", "linear", "to_smaller")


def _weights(name: str, weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{name}: expected {count} weights >= 0 with a positive sum, got {weights}")
    return weights


def _names(name: str, names: Sequence[str] | None, count: int, prefix: str) -> list[str]:
    if names is None:
        return [f"{prefix}{i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count or len(set(names)) != count:
        raise ValueError(f"{name}: expected {count} distinct names, got {names}")
    return names


def _as_list(name: str, value, count: int, what: str) -> list[torch.Tensor]:
    values = [value] if isinstance(value, torch.Tensor) else list(value)
    if len(values) != count:
        raise ValueError(f"{name}: this regulariser has {count} {what}, got {len(values)} tensor(s)")
    return values
