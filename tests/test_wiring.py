"""Every option of every public entry point reaches the computation: the entry point called with the option set to
a non-default value equals the same call made one level down with the same option, and differs from the call
without it (so that an option dropped on the way would be seen).

The options are read from the signatures, not listed by hand: a new keyword argument with a default is picked up
at collection, and its test fails until ``CASES`` gives it a value (or ``EXEMPT`` a reason). Levels:

    CrossFrameAlignLoss -> cross_frame_align_loss -> CrossFrameAlignFunction.apply -> backend choice + naive loops
    CrepaTransformer -> HiddenStateCapture + CrepaRegularizer -> projectors + the grid alignments written out + naive
    loops + weighted reduction + the figures and the same-step cutoff from cosines
    token_relation_loss / TokenRelationLoss -> TokenRelationFunction.apply (reference, cpu, triton) -> the backend's
    availability + the full [F*N, F*N] relation matrices in float64; alignment_regularizer(loss="trd") -> projectors
    + those matrices
    LambdaSchedule, the timestep weights -> their documented formulas, step by step
    encoder_features_to_tokens -> the frame grouping and the 2-D resize written out
    cknna, cross_frame_similarity, temporal_smoothness -> the naive versions of tests/test_diagnostics.py
    adapter_for(...)(video, grid) -> hand-written preprocessing + the transformers model + encoder_features_to_tokens
    build_feature_cache -> the adapter's features and cache_spec
    sequence_parallel_align_loss, SequenceParallelRegularizer -> their single-process counterparts (gloo, 3 ranks:
    tests/test_wiring_distributed.py)
"""
from __future__ import annotations

import inspect
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crepa_kernels import CrossFrameAlignFunction, CrossFrameAlignLoss, cross_frame_align_loss, explain_backend
from crepa_kernels.training import CrepaRegularizer, CrepaTransformer, HiddenStateCapture, build_projector
from crepa_kernels.training.relation_regularizer import alignment_regularizer
from crepa_kernels.training.schedule import LambdaSchedule
from crepa_kernels.training.weighting import reduce_weighted
from harness import pair_straddling_eps, random_grad_output
from naive import _clamped_cosine, _neighbour_frames, naive_loss, naive_weight

ERRORS = (ValueError, TypeError, RuntimeError, IndexError)


# --- outcomes: what a call gives, compared value by value -------------------------------------------------------
@dataclass
class Outcome:
    error: str | None  # the exception's type name, or None
    values: list = field(default_factory=list)  # tensors and plain values


def outcome(function: Callable[[dict], list], kwargs: dict) -> Outcome:
    try:
        return Outcome(None, list(function(dict(kwargs))))
    except ERRORS as error:
        return Outcome(f"{type(error).__name__}: {error}")


def same(a: Outcome, b: Outcome) -> bool:
    if (a.error is None) != (b.error is None):
        return False
    if a.error is not None:
        return a.error.split(":")[0] == b.error.split(":")[0]
    if len(a.values) != len(b.values):
        return False
    for x, y in zip(a.values, b.values):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.shape != y.shape:
                return False
            x, y = x.detach().double(), y.detach().double()
            if x.isnan().any() or y.isnan().any() or not torch.allclose(x, y, rtol=1e-6, atol=1e-9):
                return False
        elif x != y:
            return False
    return True


def describe(o: Outcome) -> str:
    if o.error:
        return o.error
    return ", ".join(f"{v.detach().double().flatten()[:4].tolist()}" if isinstance(v, torch.Tensor) else repr(v)
                     for v in o.values)


@dataclass
class EntryPoint:
    signatures: tuple  # callables whose keyword parameters with a default are the options
    run: Callable[[dict], list]  # the entry point called with these arguments
    lower: Callable[[dict], list]  # the same call one level down
    common: dict = field(default_factory=dict)  # arguments of every call (small sizes, a fast backend)


def options_of(entry: EntryPoint) -> list[str]:
    names = []
    for signature_of in entry.signatures:
        for name, parameter in inspect.signature(signature_of).parameters.items():
            if parameter.default is not inspect.Parameter.empty and parameter.kind in (
                    parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name not in names:
                names.append(name)
    return names


def split(case: dict) -> tuple[dict, dict]:
    """(arguments, flags): keys starting with '_' say how to build the inputs, not what to pass."""
    return ({k: v for k, v in case.items() if not k.startswith("_")},
            {k: v for k, v in case.items() if k.startswith("_")})


# --- the loss's three forms -----------------------------------------------------------------------------------------
SHAPE = (2, 7, 5, 6)  # [B, F, N, D]
LOSS_EPS = 0.8  # the inputs' token norms straddle it (log-uniform in [eps / 20, 5 eps])


def _loss_inputs(flags: dict):
    proj, target = pair_straddling_eps(SHAPE, LOSS_EPS, torch.float64, seed=21)
    if flags.get("_flat"):
        proj, target = (x.detach().flatten(1, 2).requires_grad_(True) for x in (proj, target))
    return proj, target


def _with_gradients(loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor) -> list:
    grads = torch.autograd.grad(loss, [proj, target], random_grad_output(loss, seed=5))
    return [loss, *grads]


def _functional(kwargs):
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    return _with_gradients(cross_frame_align_loss(proj, target, **arguments), proj, target)


def _module(kwargs):
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    num_frames = arguments.pop("num_frames", None)
    return _with_gradients(CrossFrameAlignLoss(**arguments)(proj, target, num_frames=num_frames), proj, target)


def _apply(kwargs):
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    signature = inspect.signature(CrossFrameAlignFunction.forward)
    positional = [arguments.pop(name, p.default) for name, p in list(signature.parameters.items())[2:]]
    assert not arguments, f"not arguments of CrossFrameAlignFunction.forward: {arguments}"
    return _with_gradients(CrossFrameAlignFunction.apply(proj, target, *positional), proj, target)


def _naive(kwargs):
    """Below the Function: which backend runs the call (explain_backend), then the naive loops."""
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    num_frames = arguments.pop("num_frames", None)
    backend = arguments.pop("backend", "auto")
    clamp = arguments.pop("clamp_neighbors", False)
    choice = explain_backend(proj, target, backend=backend, num_frames=num_frames, **arguments)
    if choice.backend is None:
        raise RuntimeError(choice.error)
    p, y = (x if x.dim() == 4 else x.unflatten(1, (num_frames, -1)) for x in (proj, target))
    if clamp:
        arguments["neighbors"] = min(arguments.get("neighbors", 1), p.shape[1] - 1)
    return _with_gradients(naive_loss(p, y, **arguments), proj, target)


LOSS_CASES = {
    "tau": dict(tau=3.7, neighbors=3),
    "neighbors": dict(neighbors=3),
    "neighbor_mode": dict(neighbor_mode="cumulative", neighbors=3),
    "normalize_weights": [dict(normalize_weights=True), dict(normalize_weights=True, neighbor_mode="cumulative",
                                                              neighbors=2)],
    "reduction": [dict(reduction="none"), dict(reduction="frame_sum")],
    "num_frames": dict(num_frames=SHAPE[1], _flat=True),
    "eps": dict(eps=LOSS_EPS),
    "backend": dict(backend="cuda", _raises=True),  # a CPU call: the named backend must refuse it
    "clamp_neighbors": dict(clamp_neighbors=True, neighbors=9),
    "weights": [dict(weights="gaussian", tau=0.8, neighbors=2, neighbor_mode="cumulative"),
                dict(weights=torch.tensor([0.3, 1.4], dtype=torch.float64), neighbors=2, neighbor_mode="cumulative",
                     normalize_weights=True)],
}

# --- the regulariser and the transformer wrapper -------------------------------------------------------------------
HIDDEN, FRAMES, TOKENS, BATCH = 8, 5, 3, 2


def _regularizer_inputs(flags: dict, tokens: int = TOKENS):
    """Hidden states [B, F_h * N_h, hidden] (``_hidden=(F_h, N_h)``, default the targets' grid; 4-D with
    ``_hidden_4d``) and targets [B, F, N, dim] (N = ``_tokens``; an inf in the first with ``_nonfinite``)."""
    generator = torch.Generator().manual_seed(3)
    layers, teachers, tokens = flags.get("_layers", 1), flags.get("_teachers", 1), flags.get("_tokens", tokens)
    frames_h, tokens_h = flags.get("_hidden", (FRAMES, tokens))
    hidden = [torch.randn(BATCH, frames_h * tokens_h, HIDDEN, generator=generator, dtype=torch.float64)
              for _ in range(layers)]
    if flags.get("_hidden_4d"):
        hidden = [h.unflatten(1, (frames_h, tokens_h)) for h in hidden]
    hidden = [h.requires_grad_(True) for h in hidden]
    targets = [torch.randn(BATCH, FRAMES, tokens, 4 + t, generator=generator, dtype=torch.float64)
               for t in range(teachers)]
    if flags.get("_nonfinite"):
        targets[0][0, 0, 0, 0] = math.inf
    return hidden, targets


def _forward_arguments(arguments: dict) -> dict:
    return {name: arguments.pop(name) for name in ("sample_weight", "frame_mask", "update_cutoff", "hidden_frames")
            if name in arguments}


def _make_regularizer(arguments: dict, flags: dict, kind=CrepaRegularizer) -> CrepaRegularizer:
    teachers = flags.get("_teachers", 1)
    if "_schedule" in flags:  # a fresh schedule for every call: it keeps state
        arguments = {**arguments, "loss_weight": LambdaSchedule(**flags["_schedule"])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return kind(HIDDEN, [4 + t for t in range(teachers)], **arguments).double()


def _saved_bytes(run: Callable[[], object], width: int) -> tuple[object, int]:
    """run()'s result and the bytes autograd keeps of tensors as wide as the projector's hidden layer (what
    checkpoint_projector recomputes instead)."""
    saved = []

    def pack(tensor):
        if tensor.dim() and tensor.shape[-1] == width:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(saved)


def _gradients(loss: torch.Tensor, inputs: list) -> list:
    """d loss / d inputs for a random grad_output; zeros where the loss does not depend on an input."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, random_grad_output(loss), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def alignment_state(alignment) -> list:
    """What a forward tells the schedule and the logs besides the loss: lambda, whether it folded its similarity in,
    the non-finite skip and its count, the similarity EMA."""
    ema = alignment.logs.get("similarity_ema", math.nan)
    return [alignment.weight, alignment.observed, alignment.nonfinite, alignment.logs.get("nonfinite_steps", "-"),
            "no EMA" if math.isnan(ema) else torch.tensor(ema, dtype=torch.float64)]


def _alignment_values(alignment, hidden) -> list:
    state = alignment_state(alignment)
    if alignment.nonfinite:  # the figures are NaN then: only what the skipped step gives
        return [alignment.loss, *_gradients(alignment.loss, hidden), alignment.included_frames, *state]
    neighbor = alignment.neighbor_similarity
    return [alignment.loss, alignment.self_similarity, "no neighbours" if neighbor is None else neighbor,
            sorted(alignment.terms), *[alignment.terms[name] for name in sorted(alignment.terms)],
            *_gradients(alignment.loss, hidden), alignment.cutoff_similarity, alignment.included_frames, *state]


def _regularizer(kwargs, kind=CrepaRegularizer):
    arguments, flags = split(kwargs)
    forward = _forward_arguments(arguments)
    hidden, targets = _regularizer_inputs(flags)
    regularizer = _make_regularizer(arguments, flags, kind)
    single = len(hidden) == 1 and len(targets) == 1
    alignment, saved = _saved_bytes(lambda: regularizer(hidden[0] if single else hidden,
                                                        targets[0] if single else targets, **forward),
                                    arguments.get("projector_width", 2048))
    return [*_alignment_values(alignment, hidden), saved]


def _linear_resample(x: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """x resampled to ``count`` along ``dim`` by linear interpolation with half-cell centres (align_corners=False):
    output i reads the source position (i + 1/2) size / count - 1/2, clamped to [0, size - 1]."""
    size = x.shape[dim]
    rows = []
    for i in range(count):
        position = min(max((i + 0.5) * size / count - 0.5, 0.0), size - 1)
        low = math.floor(position)
        high, fraction = min(low + 1, size - 1), position - low
        rows.append((1 - fraction) * x.select(dim, low) + fraction * x.select(dim, high))
    return torch.stack(rows, dim)


def _picked(x: torch.Tensor, count: int) -> torch.Tensor:
    """The frames 0, (F - 1) / (count - 1), ... (rounded down) of x [B, F, ...]."""
    frames = x.shape[1]
    if frames == count:
        return x
    return x[:, [math.floor(k * (frames - 1) / (count - 1)) for k in range(count)]]


def _to_tokens_count(x: torch.Tensor, count: int, square_grids: bool) -> torch.Tensor:
    """x [B, F, N, D] -> [B, F, count, D]: bilinear on the square maps when both N and count are squares (and
    ``square_grids``), else 1-D linear over the token sequence."""
    tokens = x.shape[2]
    side, new_side = math.isqrt(tokens), math.isqrt(count)
    if tokens == count:
        return x
    if square_grids and side * side == tokens and new_side * new_side == count:
        maps = x.unflatten(2, (side, side))
        return _linear_resample(_linear_resample(maps, new_side, 2), new_side, 3).flatten(2, 3)
    return _linear_resample(x, count, 2)


def _relation_formula(proj, target, pairs="all", margin=0.0, anchors=None, reduction="mean", eps=1e-12):
    """VideoREPA's token relation distillation at tiny size, the full [T, T] relation matrices of each sample:
    L[b, f] = sum over rows i of frame f and counted keys j of relu(|cos(p_i, p_j) - cos(y_i, y_j)| - margin)."""
    batch, frames, tokens, _ = proj.shape
    p, y = proj.double().flatten(1, 2), target.double().flatten(1, 2)

    def unit(x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x / torch.where(norm > eps, norm, torch.full_like(norm, eps))

    relation_p, relation_y = unit(p) @ unit(p).transpose(1, 2), unit(y) @ unit(y).transpose(1, 2)
    term = torch.relu((relation_p - relation_y).abs() - margin)  # [B, T, T]
    frame_of = torch.arange(frames * tokens) // tokens
    counted = {"all": torch.ones(frames * tokens, frames * tokens, dtype=torch.bool),
               "spatial": frame_of[:, None] == frame_of[None, :],
               "temporal": frame_of[:, None] != frame_of[None, :]}[pairs].double()
    keys = list(range(frames * tokens)) if anchors is None else anchors.tolist()  # a repeated anchor counts twice
    per_row = (term[:, :, keys] * counted[:, keys]).sum(-1)  # [B, T]
    per_frame = per_row.unflatten(1, (frames, tokens)).sum(-1)
    if reduction == "none":
        return per_frame
    count = batch * counted[:, keys].sum()
    if count == 0:
        raise ValueError("no pair counts")
    return per_frame.sum() / count


def _mirror_alignment(arguments: dict, flags: dict, hidden: list, targets: list, forward: dict):
    """The regulariser's forward written out below it: its projectors' weights loaded into projectors built here
    from the options (the convolution over the token grid written out), the grids aligned by hand, the naive loops
    (or the relation formula, loss="trd") for the loss, the weighted reduction, the figures from cosines and the
    lambda of a same-step similarity cutoff."""
    kind_of_regularizer = alignment_regularizer if "loss" in arguments else CrepaRegularizer
    weights_from = _make_regularizer(dict(arguments), flags, kind_of_regularizer)
    get = arguments.get
    trd = get("loss", "crepa") == "trd"
    layers, teachers = get("num_layers", 1), len(targets)
    shared = get("share_projector", False)
    kind = get("projector", "mlp")
    projectors = {}
    for l in range(layers):
        for t in range(teachers):
            index = t if shared else l * teachers + t
            if index not in projectors:
                if kind == "conv":
                    height, width = get("projector_grid")
                    conv = weights_from.projectors[index].conv

                    def projector(x, conv=conv, height=height, width=width):  # x fastest within a frame's grid
                        maps = x.reshape(-1, height, width, x.shape[-1]).permute(0, 3, 1, 2)
                        out = F.conv2d(maps, conv.weight, conv.bias, padding=1).permute(0, 2, 3, 1)
                        return out.reshape(*x.shape[:-1], out.shape[-1])
                else:
                    projector = build_projector(HIDDEN, 4 + t, kind=kind, width=get("projector_width", 2048),
                                                depth=get("projector_depth", 3)).double()
                    projector.load_state_dict(weights_from.projectors[index].state_dict())  # strict: same layout
                projectors[index] = projector
    if len(weights_from.projectors) != len(projectors):
        raise RuntimeError(f"{len(weights_from.projectors)} projectors, expected {len(projectors)}")
    layer_weights = list(get("layer_weights") or [1.0] * layers)
    teacher_weights = list(get("teacher_weights") or [1.0] * teachers)
    layer_names = list(get("layer_names") or [f"layer{i}" for i in range(layers)])
    teacher_names = list(get("teacher_names") or [f"teacher{i}" for i in range(teachers)])
    eps = get("eps", 1e-12)
    if get("target_norm", "none") == "spatial":  # per frame and channel over the tokens, Bessel's std
        gamma = get("spatial_norm_gamma", 1.0)
        targets = [(y - gamma * y.mean(2, keepdim=True)) / (y.std(2, keepdim=True) + 1e-6) for y in targets]
    frames, tokens = targets[0].shape[1:3]
    hidden_frames = forward.get("hidden_frames")
    if hidden[0].dim() == 4:
        grid = tuple(hidden[0].shape[1:3])
    elif hidden_frames is not None:
        grid = (hidden_frames, hidden[0].shape[1] // hidden_frames)
    else:
        grid = (frames, tokens)
    if get("frame_align", "exact") == "pick":
        frames = min(frames, grid[0])
    neighbors = get("neighbors", 1)
    if get("clamp_neighbors", False):
        neighbors = min(neighbors, frames - 1)
    loss_options = dict(tau=get("tau", 1.0), neighbors=neighbors, neighbor_mode=get("neighbor_mode", "adjacent"),
                        normalize_weights=get("normalize_weights", False), eps=eps,
                        weights=get("weights", "exponential"))
    weight = get("loss_weight", 0.5)
    schedule = flags.get("_schedule")
    if schedule is not None:
        weight = schedule["weight"]
    mask = forward.get("frame_mask")
    included = torch.ones(BATCH, frames, dtype=torch.float64) if mask is None else mask.double()
    losses, selfs, neighbours, signals, term_weights, terms = [], [], [], [], [], {}
    for l in range(layers):
        for t in range(teachers):
            projector = projectors[t if shared else l * teachers + t]
            if get("checkpoint_projector", False):
                proj = torch.utils.checkpoint.checkpoint(projector, hidden[l], use_reentrant=False)
            else:
                proj = projector(hidden[l])
            if proj.dim() == 3:
                if proj.shape[1] != grid[0] * grid[1]:
                    raise ValueError(f"{proj.shape[1]} tokens, not a {grid} grid")
                proj = proj.unflatten(1, grid)
            target = targets[t]
            if get("frame_align", "exact") == "pick":
                proj, target = _picked(proj, frames), _picked(target, frames)
            if get("token_align", "exact") == "linear":
                proj = _to_tokens_count(proj, target.shape[2], square_grids=False)
            elif get("token_align", "exact") == "to_smaller":
                count = min(proj.shape[2], target.shape[2])
                proj, target = (_to_tokens_count(x, count, square_grids=True) for x in (proj, target))
            if get("pool_tokens", False):
                proj, target = proj.mean(2, keepdim=True), target.mean(2, keepdim=True)
            choice = explain_backend(proj, target, backend=get("backend", "auto"), **loss_options)
            if choice.backend is None:
                raise RuntimeError(choice.error)
            if trd:  # each frame's rows: the mean of their relation terms over the pairs they count
                per_frame = _relation_formula(proj, target, get("pairs", "all"), get("margin", 0.0),
                                              reduction="none", eps=eps)
                count_per_row = {"all": proj.shape[1], "spatial": 1, "temporal": proj.shape[1] - 1}[
                    get("pairs", "all")] * proj.shape[2]
                per_frame = per_frame / (proj.shape[2] * count_per_row)
            else:
                per_frame = naive_loss(proj, target, reduction="none", **loss_options)
            loss = reduce_weighted(per_frame, get("reduction", "mean"), forward.get("sample_weight"), mask)
            with torch.no_grad():
                cos = torch.stack([torch.stack([torch.stack([
                    _clamped_cosine(proj[b, f], target[b, k], eps).mean() for k in range(frames)])
                    for f in range(frames)]) for b in range(BATCH)])  # [B, f, k]
                self_term = (cos.diagonal(dim1=1, dim2=2) * included).sum() / included.sum()
                total, weights, row_sums = 0.0, 0.0, []
                for f in range(frames):
                    row_sum = 1.0
                    for k in _neighbour_frames(f, frames, neighbors, loss_options["neighbor_mode"]):
                        w = naive_weight(abs(k - f), loss_options["tau"], loss_options["weights"])
                        total = total + (w * cos[:, f, k] * included[:, f]).sum()
                        weights = weights + w * included[:, f].sum()
                        row_sum += w
                    row_sums.append(1.0 if loss_options["normalize_weights"] else row_sum)
                signal = {"self": self_term,
                          "total": (-per_frame * included).sum() / included.sum(),
                          "normalized": (-per_frame / torch.tensor(row_sums, dtype=torch.float64) * included).sum()
                          / included.sum()}[get("similarity_signal", "self")]
                neighbours.append(None if trd or isinstance(weights, float) else total / weights)
            losses.append(loss)
            selfs.append(self_term)
            signals.append(signal)
            term_weights.append(layer_weights[l] * teacher_weights[t])
            terms[f"{layer_names[l]}/{teacher_names[t]}"] = loss.detach()
    norm = sum(term_weights)
    align = sum(w * x for w, x in zip(term_weights, losses)) / norm
    self_similarity = sum(w * x for w, x in zip(term_weights, selfs)) / norm
    neighbor = (None if neighbours[0] is None else sum(w * x for w, x in zip(term_weights, neighbours)) / norm)
    cutoff_similarity = sum(w * x for w, x in zip(term_weights, signals)) / norm
    included_frames = included.sum()
    skip = get("skip_nonfinite", False)
    nonfinite = skip and not bool(torch.isfinite(align))
    observed, ema = False, "no EMA"
    if schedule is not None and schedule.get("cutoff_timing") == "same_step" and forward.get("update_cutoff", True):
        observed = True
        if not nonfinite:  # the first similarity starts the EMA; lambda is 0 from the step it reaches the threshold
            ema = cutoff_similarity
            weight = 0.0 if ema >= schedule["similarity_threshold"] else weight
    if nonfinite or weight == 0.0:
        weight, align = 0.0, torch.zeros((), dtype=torch.float64)
    state = [weight, observed, nonfinite, float(nonfinite) if skip else "-", ema]
    if nonfinite:
        return weight * align, included_frames.new_zeros(()), state
    return weight * align, self_similarity, neighbor, terms, cutoff_similarity, included_frames, state


def _regularizer_lower(kwargs):
    arguments, flags = split(kwargs)
    forward = _forward_arguments(arguments)
    hidden, targets = _regularizer_inputs(flags)
    mirrored, saved = _saved_bytes(lambda: _mirror_alignment(arguments, flags, hidden, targets, forward),
                                   arguments.get("projector_width", 2048))
    if len(mirrored) == 3:  # a skipped non-finite step
        loss, included, state = mirrored
        return [loss, *_gradients(loss, hidden), included, *state, saved]
    loss, self_similarity, neighbor, terms, cutoff_similarity, included, state = mirrored
    return [loss, self_similarity, "no neighbours" if neighbor is None else neighbor, sorted(terms),
            *[terms[name] for name in sorted(terms)], *_gradients(loss, hidden), cutoff_similarity, included,
            *state, saved]


def _mask():
    mask = torch.ones(BATCH, FRAMES, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[1, 4] = False
    return mask


REGULARIZER_CASES = {
    **{name: case for name, case in LOSS_CASES.items() if name not in ("num_frames", "clamp_neighbors", "eps")},
    "eps": dict(eps=0.38),  # the projected states' norms are about 0.3 to 0.45
    "loss_weight": dict(loss_weight=0.3),
    "projector": dict(projector="linear"),
    "projector_width": dict(projector_width=12),
    "projector_depth": dict(projector_depth=2),
    "checkpoint_projector": dict(checkpoint_projector=True),
    "num_layers": dict(num_layers=2, _layers=2),
    "share_projector": dict(share_projector=True, num_layers=2, _layers=2),
    "layer_weights": dict(layer_weights=[0.2, 1.0], num_layers=2, _layers=2),
    "teacher_weights": dict(teacher_weights=[1.0, 0.3], _teachers=2),
    "layer_names": dict(layer_names=["early", "late"], num_layers=2, _layers=2),
    "teacher_names": dict(teacher_names=["dino", "jepa"], _teachers=2),
    "sample_weight": dict(sample_weight=torch.tensor([0.25, 1.5], dtype=torch.float64)),
    "frame_mask": dict(frame_mask=_mask()),
    # upstream trainers' conventions (docs/porting.md)
    "clamp_neighbors": dict(clamp_neighbors=True, neighbors=9),
    "similarity_signal": [dict(similarity_signal="total"),
                          dict(similarity_signal="normalized", tau=2.0, neighbors=2, neighbor_mode="cumulative")],
    "skip_nonfinite": dict(skip_nonfinite=True, _nonfinite=True),
    # 7 hidden frames, 5 target frames: the hidden states' frames 0, 1, 3, 4, 6; or 3 hidden frames: the targets'
    "frame_align": [dict(frame_align="pick", hidden_frames=7, _hidden=(7, TOKENS)),
                    dict(frame_align="pick", _hidden=(3, TOKENS), _hidden_4d=True, frame_mask=_mask()[:, :3])],
    "hidden_frames": dict(hidden_frames=7, frame_align="pick", _hidden=(7, TOKENS)),
    "token_align": [dict(token_align="linear", _hidden=(FRAMES, 7), _hidden_4d=True),
                    dict(token_align="to_smaller", _hidden=(FRAMES, 9), _tokens=4, _hidden_4d=True),  # 3x3 -> 2x2
                    dict(token_align="to_smaller", _hidden=(FRAMES, 2), _hidden_4d=True)],  # 1-D, 3 -> 2 tokens
    "pool_tokens": dict(pool_tokens=True),
    "target_norm": dict(target_norm="spatial"),
    "spatial_norm_gamma": dict(spatial_norm_gamma=0.5, target_norm="spatial"),
    "projector_grid": dict(projector_grid=(2, 3), projector="conv", _tokens=6),
    # a threshold every similarity reaches: the forward that folds its similarity in has lambda 0
    "update_cutoff": dict(update_cutoff=False, _schedule=dict(weight=0.3, similarity_threshold=-1.0,
                                                               cutoff_timing="same_step")),
}
REGULARIZER_CASES["projector"] = [REGULARIZER_CASES["projector"], dict(projector="conv", projector_grid=(3, 2),
                                                                       _tokens=6)]


class TupleBlock(nn.Module):
    """A block returning (hidden, side output), as CogVideoX's and HunyuanVideo's do."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        y = torch.tanh(self.linear(x))
        return y, 2.0 * y + 1.0


class ToyTransformer(nn.Module):
    """Two block lists (``blocks``, then ``single_blocks``) of tuple-returning blocks."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.blocks = nn.ModuleList(TupleBlock(HIDDEN) for _ in range(3))
            self.single_blocks = nn.ModuleList(TupleBlock(HIDDEN) for _ in range(2))
        self.double()

    def forward(self, x):
        for block in (*self.blocks, *self.single_blocks):
            x = block(x)[0]
        return x


TRANSFORMER_COMMON = dict(backend="reference", projector_width=16)


def _transformer_inputs():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(BATCH, FRAMES * TOKENS, HIDDEN, generator=generator, dtype=torch.float64)
    targets = torch.randn(BATCH, FRAMES, TOKENS, 4, generator=generator, dtype=torch.float64)
    return x, targets


def _split_transformer(arguments: dict):
    construction = {name: arguments.pop(name) for name in ("blocks", "output_index") if name in arguments}
    forward = _forward_arguments(arguments)
    return construction, forward, arguments


def _transformer(kwargs):
    arguments, flags = split(kwargs)
    construction, forward, regularizer_options = _split_transformer(arguments)
    transformer, (x, targets) = ToyTransformer(), _transformer_inputs()
    model = CrepaTransformer(transformer, _make_regularizer(regularizer_options, flags), 1, **construction)
    output, alignment = model(x, targets=targets, **forward)
    return [output, *_alignment_values(alignment, list(transformer.parameters())[:1])]


def _transformer_lower(kwargs):
    arguments, flags = split(kwargs)
    construction, forward, regularizer_options = _split_transformer(arguments)
    transformer, (x, targets) = ToyTransformer(), _transformer_inputs()
    regularizer = _make_regularizer(regularizer_options, flags)
    with HiddenStateCapture(transformer, 1, **construction) as capture:
        output = transformer(x)
        alignment = regularizer(capture.pop(), targets, **forward)
    return [output, *_alignment_values(alignment, list(transformer.parameters())[:1])]


TRANSFORMER_CASES = {
    "blocks": dict(blocks="single_blocks"),
    "output_index": dict(output_index=1),
    "sample_weight": dict(sample_weight=torch.tensor([0.25, 1.5], dtype=torch.float64)),
    "frame_mask": dict(frame_mask=_mask()),
}
# --- encoders and the feature cache ----------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from crepa_kernels.training import build_feature_cache  # noqa: E402
from crepa_kernels.training.encoders import EncoderAdapter, adapter_for, random_encoder  # noqa: E402
from crepa_kernels.training.feature_cache import FeatureCache, cache_spec  # noqa: E402
from crepa_kernels.training.token_grid import encoder_features_to_tokens  # noqa: E402

VIDEO = (2, 3, 9, 40, 72)  # [B, 3, F, H, W]: 9 frames of 40 x 72, non-square
GRID = (3, 4, 7)  # the DiT's (F', H', W') for a 4x temporal VAE
MODEL_TYPE = "dinov2"  # resampling default: bicubic
_ENCODER_CALLS: list[int] = []


def _encoder():
    model = random_encoder(MODEL_TYPE, seed=3)
    model.register_forward_pre_hook(lambda module, args, kwargs: _ENCODER_CALLS.append(
        kwargs["pixel_values"].shape[0]), with_kwargs=True)
    return model


def _video(flags: dict) -> torch.Tensor:
    video = torch.rand(VIDEO, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    if flags.get("_range") == (-1.0, 1.0):
        video = video * 2 - 1
    return video.transpose(1, 2).contiguous() if flags.get("_layout") == "BFCHW" else video


def _grid(flags: dict) -> tuple[int, int, int]:
    return flags.get("_grid", GRID)


def _adapter(kwargs):
    arguments, flags = split(kwargs)
    _ENCODER_CALLS.clear()
    adapter = adapter_for(_encoder(), temporal_ratio=4, **arguments)
    targets = adapter(_video(flags), _grid(flags))
    return [targets, list(_ENCODER_CALLS), adapter.describe(_grid(flags))["encoder"]["name_or_path"]]


def _adapter_lower(kwargs):
    """The adapter written out: layout, value range, resize, normalisation, the model chunk by chunk (prefix tokens
    dropped), then encoder_features_to_tokens."""
    arguments, flags = split(kwargs)
    _ENCODER_CALLS.clear()
    model = _encoder()
    get = arguments.get
    video = _video(flags)
    frames = video if get("layout", "BCFHW") == "BFCHW" else video.transpose(1, 2)
    if frames.shape[2] != 3:
        raise ValueError("not a video in this layout")
    low, high = get("value_range", (0.0, 1.0))
    patch = model.config.patch_size
    height, width = frames.shape[-2:]
    resolution = get("resolution", model.config.image_size)
    if resolution == "token_grid":
        size = (_grid(flags)[1] * patch, _grid(flags)[2] * patch)
    elif isinstance(resolution, tuple):
        size = resolution
    else:
        scale = resolution / min(height, width)
        size = tuple(max(patch, round(side * scale / patch) * patch) for side in (height, width))
    mean = torch.tensor(get("image_mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
    std = torch.tensor(get("image_std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
    ratio = 4
    if get("temporal_mode") == "subsample":  # only the frames kept are encoded (0, r, 2r, ...)
        frames, ratio = frames[:, ::4], 1
    flat = frames.flatten(0, 1).float()
    chunks = []
    dtype = get("compute_dtype", "auto")
    for chunk in flat.split(get("chunk_size", 16)):
        pixels = F.interpolate((chunk - low) / (high - low), size=size, mode=get("resample", "bicubic"),
                               align_corners=False, antialias=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            hidden = model(pixel_values=(pixels - mean) / std).last_hidden_state
        chunks.append(hidden[:, 1:].float())
    features = torch.cat(chunks).unflatten(0, frames.shape[:2]).unflatten(2, (size[0] // patch, size[1] // patch))
    targets = encoder_features_to_tokens(features, _grid(flags), temporal_ratio=ratio,
                                         temporal_patch=get("temporal_patch", 1),
                                         temporal_mode=get("temporal_mode", "mean"))
    return [targets, list(_ENCODER_CALLS), get("name_or_path")]


ENCODER_CASES = {
    "temporal_patch": dict(temporal_patch=3, _grid=(1, 4, 7)),
    "temporal_mode": dict(temporal_mode="subsample"),
    "layout": dict(layout="BFCHW", _layout="BFCHW"),
    "value_range": dict(value_range=(-1.0, 1.0), _range=(-1.0, 1.0)),
    # shorter side 28 -> 40 x 72 becomes 28 x 50.4: 3.6 patches of 14 wide, rounded to 4
    "resolution": [dict(resolution=28), dict(resolution=(14, 42)), dict(resolution="token_grid", _grid=(3, 3, 5))],
    "image_mean": dict(image_mean=(0.5, 0.4, 0.3)),
    "image_std": dict(image_std=(0.5, 0.25, 0.125)),
    "resample": dict(resample="bilinear"),
    "chunk_size": dict(chunk_size=7),
    "compute_dtype": dict(compute_dtype=torch.bfloat16),
    "name_or_path": dict(name_or_path="local/dinov2-small"),
}


def _samples():
    generator = torch.Generator().manual_seed(11)
    return [(f"clip {i}", torch.rand(3, 9, 40, 64, generator=generator)) for i in range(2)]


def _cache(kwargs):
    arguments, flags = split(kwargs)
    adapter = adapter_for(random_encoder(MODEL_TYPE, seed=3), temporal_ratio=4)
    with tempfile.TemporaryDirectory(prefix="crepa-wiring-cache-") as root:
        build_feature_cache(root, _samples(), adapter, GRID, progress=False, **arguments)
        cache = FeatureCache(root)
        return [cache.spec, *[cache.load(sample_id) for sample_id, _ in _samples()],
                *[cache.load(sample_id).dtype for sample_id, _ in _samples()]]


def _cache_lower(kwargs):
    arguments, flags = split(kwargs)
    adapter = adapter_for(random_encoder(MODEL_TYPE, seed=3), temporal_ratio=4)
    dtype = arguments.get("storage_dtype", torch.bfloat16)
    spec = json.loads(json.dumps(cache_spec(adapter, GRID, dtype, arguments.get("extra"))))
    features = [adapter(video[None], GRID)[0].to(dtype) for _, video in _samples()]
    return [spec, *features, *[f.dtype for f in features]]


CACHE_CASES = {
    "storage_dtype": dict(storage_dtype=torch.float32),
    "extra": dict(extra={"vae": "wan2.1", "crop": [1, 2]}),
}


# --- the lambda schedule, the token grid, the timestep weights -------------------------------------------------------
from crepa_kernels.training.token_grid import TEMPORAL_MODES  # noqa: E402
from crepa_kernels.training.weighting import hard_timestep_weight, sigmoid_timestep_weight  # noqa: E402

SIMILARITIES = [0.1, 0.5, 0.3, 0.7, 0.65, 0.9, 0.2, 0.8, 0.95, 0.4, 0.6, 0.75, 0.85, 0.5]


def _schedule(kwargs, similarities=SIMILARITIES):
    """The schedule driven as the regulariser drives it: per step, with cutoff_timing="same_step" the forward folds
    its similarity in (observe), lambda is read, then step() after the optimizer step."""
    arguments, _ = split(kwargs)
    schedule = LambdaSchedule(**arguments)
    values = []
    for similarity in similarities:
        if schedule.cutoff_timing == "same_step":
            schedule.observe(similarity)
        values.append(schedule.value())
        schedule.step(similarity)
    return [*values, schedule.cut_off]


def _schedule_lower(kwargs, similarities=SIMILARITIES):
    """The module docstring's formula, step by step, with the EMA and the cutoff's state written out."""
    arguments, _ = split(kwargs)
    get = arguments.get
    weight, shape, warmup = get("weight", 0.5), get("shape", "constant"), get("warmup_steps", 0)
    decay_steps, final, power, cutoff = get("decay_steps"), get("final_weight", 0.0), get("power", 1.0), get(
        "cutoff_step")
    threshold, decay = get("similarity_threshold"), get("similarity_ema_decay", 0.99)
    permanent = get("threshold_mode", "permanent") == "permanent"
    same_step = get("cutoff_timing", "next_step") == "same_step"
    if shape != "constant" and not decay_steps:
        raise ValueError("decay_steps needed")

    def shape_value(step):
        if cutoff is not None and step >= cutoff:
            return 0.0
        if step < warmup:
            return weight * (step + (0 if get("warmup_from_zero", True) else 1)) / warmup
        if shape == "constant":
            return weight
        progress = min(1.0, (step - warmup) / decay_steps)
        fraction = {"linear": 1 - progress, "cosine": (1 + math.cos(math.pi * progress)) / 2,
                    "polynomial": (1 - progress) ** power}[shape]
        return final + (weight - final) * fraction

    values, ema, ever, over = [], None, False, False  # ever: the EMA reached the threshold once; over: it is now

    def cut():
        return ever if permanent else over

    def watched(step):  # this step's similarity goes into the EMA
        if threshold is None or (permanent and ever) or (cutoff is not None and step >= cutoff):
            return False
        return get("similarity_every_step", False) or shape_value(step) > 0

    def fold(similarity):
        nonlocal ema, ever, over
        ema = similarity if ema is None else decay * ema + (1 - decay) * similarity
        over = ema >= threshold
        ever = ever or over

    for step, similarity in enumerate(similarities):
        if same_step and watched(step):
            fold(similarity)
        values.append(0.0 if cut() else shape_value(step))
        if not same_step and watched(step):
            fold(similarity)
    return [*values, cut()]


SCHEDULE_CASES = {
    "weight": dict(weight=0.8),
    "shape": dict(shape="linear", decay_steps=5),
    "warmup_steps": dict(warmup_steps=3),
    "decay_steps": dict(decay_steps=4, shape="cosine"),
    "final_weight": dict(final_weight=0.2, shape="linear", decay_steps=4),
    "power": dict(power=2.5, shape="polynomial", decay_steps=6),
    "cutoff_step": dict(cutoff_step=4),
    "similarity_threshold": dict(similarity_threshold=0.12),  # the EMA (decay 0.99) passes it at step 5
    "similarity_ema_decay": dict(similarity_ema_decay=0.5, similarity_threshold=0.6),
    # decay 0.5: the EMA reaches 0.6 at step 5 (0.74), falls below at step 6 (0.47), is over again from step 7
    "threshold_mode": dict(threshold_mode="recoverable", similarity_ema_decay=0.5, similarity_threshold=0.6),
    "cutoff_timing": [dict(cutoff_timing="same_step", similarity_ema_decay=0.5, similarity_threshold=0.6),
                      dict(cutoff_timing="same_step", threshold_mode="recoverable", similarity_ema_decay=0.5,
                           similarity_threshold=0.6)],
    # warm-up step 0 has lambda 0: its similarity (0.1) starts the EMA only when every step is watched
    "similarity_every_step": dict(similarity_every_step=True, warmup_steps=3, similarity_ema_decay=0.5,
                                  similarity_threshold=0.6),
    "warmup_from_zero": dict(warmup_from_zero=False, warmup_steps=3),
}


def _features():
    return torch.randn(2, 9, 3, 5, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)


def _to_tokens(kwargs):
    arguments, flags = split(kwargs)
    return [encoder_features_to_tokens(_features(), flags.get("_grid", (3, 4, 6)), temporal_ratio=4, **arguments)]


def _to_tokens_lower(kwargs):
    """Frame 0 alone, then each group of 4 pixel frames (mean or last), then groups of temporal_patch latent frames,
    then a 2-D bilinear resize of each frame, written out."""
    arguments, flags = split(kwargs)
    mode, patch = arguments.get("temporal_mode", "mean"), arguments.get("temporal_patch", 1)
    if mode not in TEMPORAL_MODES:
        raise ValueError(mode)
    features = _features()

    def pick(group):
        return group.mean(dim=1) if mode == "mean" else group[:, -1]

    latent = [features[:, 0]] + [pick(features[:, 1 + i:5 + i]) for i in range(0, 8, 4)]
    latent = torch.stack([pick(torch.stack(latent[i:i + patch], 1)) for i in range(0, len(latent), patch)], 1)
    grid = flags.get("_grid", (3, 4, 6))
    b, f, h, w, d = latent.shape
    maps = F.interpolate(latent.permute(0, 1, 4, 2, 3).reshape(b * f, d, h, w), size=grid[1:], mode="bilinear",
                         align_corners=False, antialias=arguments.get("antialias", True))
    return [maps.reshape(b, f, d, -1).transpose(2, 3)]


TOKEN_CASES = {
    "temporal_patch": dict(temporal_patch=3, _grid=(1, 4, 6)),
    "temporal_mode": dict(temporal_mode="subsample"),
    "antialias": dict(antialias=False, _grid=(3, 2, 3)),  # downsampling: antialiasing changes the values
}

TIMES = torch.tensor([0.0, 0.2, 0.3, 0.5, 0.7, 1.0], dtype=torch.float64)


def _hard(kwargs):
    return [hard_timestep_weight(TIMES, **split(kwargs)[0])]


def _hard_lower(kwargs):
    threshold = split(kwargs)[0].get("threshold", 0.5)
    return [torch.tensor([1.0 if t <= threshold else 0.0 for t in TIMES.tolist()], dtype=torch.float64)]


def _sigmoid(kwargs):
    return [sigmoid_timestep_weight(TIMES, **split(kwargs)[0])]


def _sigmoid_lower(kwargs):
    arguments = split(kwargs)[0]
    center, sharpness = arguments.get("center", 0.5), arguments.get("sharpness", 10.0)
    return [torch.tensor([1 / (1 + math.exp(-sharpness * (center - t))) for t in TIMES.tolist()],
                         dtype=torch.float64)]


# --- the diagnostics ---------------------------------------------------------------------------------------------
from crepa_kernels.diagnostics import cknna, cross_frame_similarity, temporal_smoothness  # noqa: E402
from test_diagnostics import naive_cknna, naive_similarity, naive_smoothness  # noqa: E402


def _cknna_inputs():
    generator = torch.Generator().manual_seed(17)
    a = torch.randn(23, 6, generator=generator, dtype=torch.float64)
    return a, 0.5 * a[:, :5] + torch.randn(23, 5, generator=generator, dtype=torch.float64)


def _cknna(kwargs):
    return [cknna(*_cknna_inputs(), **split(kwargs)[0])]


def _cknna_lower(kwargs):
    return [torch.as_tensor(naive_cknna(*_cknna_inputs(), split(kwargs)[0].get("topk", 10)), dtype=torch.float64)]


def _similarity(kwargs):
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    return [cross_frame_similarity(proj, target, **arguments)]


def _similarity_lower(kwargs):
    arguments, flags = split(kwargs)
    proj, target = (x.detach() for x in _loss_inputs({}))  # the naive loops take [B, F, N, D]
    return [naive_similarity(proj, target, eps=arguments.get("eps", 1e-12))]


def _smoothness(kwargs):
    arguments, flags = split(kwargs)
    return [temporal_smoothness(_loss_inputs(flags)[0].detach(), **arguments)]


def _smoothness_lower(kwargs):
    return [torch.tensor(naive_smoothness(_loss_inputs({})[0].detach()), dtype=torch.float64)]


# --- the token relation distillation loss (issue 24) -------------------------------------------------------------
from crepa_kernels import TokenRelationFunction, TokenRelationLoss, token_relation_loss  # noqa: E402
from crepa_kernels.relation_function import select_relation_backend  # noqa: E402


def _relation_functional(kwargs):
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    return _with_gradients(token_relation_loss(proj, target, **arguments), proj, target)


def _relation_module(kwargs):
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    call = {name: arguments.pop(name) for name in ("num_frames", "anchors") if name in arguments}
    return _with_gradients(TokenRelationLoss(**arguments)(proj, target, **call), proj, target)


def _relation_apply(kwargs):
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    signature = inspect.signature(TokenRelationFunction.forward)
    positional = [arguments.pop(name, p.default) for name, p in list(signature.parameters.items())[2:]]
    assert not arguments, f"not arguments of TokenRelationFunction.forward: {arguments}"
    return _with_gradients(TokenRelationFunction.apply(proj, target, *positional), proj, target)


def _relation_naive(kwargs):
    """Below the Function: the backend's availability, then the relation matrices written out (_relation_formula)."""
    arguments, flags = split(kwargs)
    proj, target = _loss_inputs(flags)
    num_frames = arguments.pop("num_frames", None)
    select_relation_backend(arguments.pop("backend", "auto"), proj.device)
    p, y = (x if x.dim() == 4 else x.unflatten(1, (num_frames, -1)) for x in (proj, target))
    return _with_gradients(_relation_formula(p, y, **arguments), proj, target)


RELATION_ANCHORS = torch.tensor([0, 3, 3, 17, 34])  # token 3 twice: it counts twice
RELATION_CASES = {
    "pairs": [dict(pairs="spatial"), dict(pairs="temporal")],
    "margin": dict(margin=0.3),
    "anchors": [dict(anchors=RELATION_ANCHORS), dict(anchors=RELATION_ANCHORS, pairs="temporal")],
    "num_frames": dict(num_frames=SHAPE[1], _flat=True),
    "reduction": dict(reduction="none"),
    "eps": dict(eps=LOSS_EPS),
    "backend": dict(backend="cuda", _raises=True),  # no CUDA kernel for this loss: the name is refused
}


def _relation_regularizer(kwargs):
    return _regularizer(kwargs, alignment_regularizer)


TRD = dict(loss="trd")
RELATION_REGULARIZER_CASES = {
    "loss": dict(loss="trd"),
    "pairs": [dict(pairs="spatial", **TRD), dict(pairs="temporal", **TRD)],
    "margin": dict(margin=0.2, **TRD),
    "sample_weight": dict(sample_weight=torch.tensor([0.25, 1.5], dtype=torch.float64), **TRD),
    "frame_mask": dict(frame_mask=_mask(), **TRD),
    "update_cutoff": dict(update_cutoff=False, _schedule=dict(weight=0.3, similarity_threshold=-1.0,
                                                               cutoff_timing="same_step"), **TRD),
    "hidden_frames": dict(hidden_frames=7, frame_align="pick", _hidden=(7, TOKENS), **TRD),
}


# --- the registry ------------------------------------------------------------------------------------------------
ENTRY_POINTS = {
    "cross_frame_align_loss": EntryPoint((cross_frame_align_loss,), _functional, _apply,
                                         dict(backend="reference")),
    "CrossFrameAlignLoss": EntryPoint((CrossFrameAlignLoss.__init__, CrossFrameAlignLoss.forward), _module,
                                      _functional, dict(backend="reference")),
    "CrossFrameAlignFunction.apply": EntryPoint((CrossFrameAlignFunction.forward,), _apply, _naive,
                                                dict(backend="reference")),
    # the same on the fused backends: each option reaches their kernels
    "CrossFrameAlignFunction.apply[cpu]": EntryPoint((CrossFrameAlignFunction.forward,), _apply, _naive,
                                                     dict(backend="cpu")),
    "CrossFrameAlignFunction.apply[triton]": EntryPoint((CrossFrameAlignFunction.forward,), _apply, _naive,
                                                        dict(backend="triton")),
    "CrepaRegularizer": EntryPoint((CrepaRegularizer.__init__, CrepaRegularizer.forward), _regularizer,
                                   _regularizer_lower, TRANSFORMER_COMMON),
    "CrepaTransformer": EntryPoint((CrepaTransformer.__init__, CrepaTransformer.forward), _transformer,
                                   _transformer_lower, TRANSFORMER_COMMON),
    "token_relation_loss": EntryPoint((token_relation_loss,), _relation_functional, _relation_apply,
                                      dict(backend="reference")),
    "TokenRelationLoss": EntryPoint((TokenRelationLoss.__init__, TokenRelationLoss.forward), _relation_module,
                                    _relation_functional, dict(backend="reference")),
    "TokenRelationFunction.apply": EntryPoint((TokenRelationFunction.forward,), _relation_apply, _relation_naive,
                                              dict(backend="reference")),
    "TokenRelationFunction.apply[cpu]": EntryPoint((TokenRelationFunction.forward,), _relation_apply,
                                                   _relation_naive, dict(backend="cpu")),
    "TokenRelationFunction.apply[triton]": EntryPoint((TokenRelationFunction.forward,), _relation_apply,
                                                      _relation_naive, dict(backend="triton")),
    # loss="trd" builds a TokenRelationRegularizer: its projectors + the relation formula, one level down
    "alignment_regularizer": EntryPoint((alignment_regularizer, CrepaRegularizer.forward), _relation_regularizer,
                                        _regularizer_lower, TRANSFORMER_COMMON),
    "adapter_for": EntryPoint((EncoderAdapter.__init__,), _adapter, _adapter_lower),
    "build_feature_cache": EntryPoint((build_feature_cache,), _cache, _cache_lower),
    "LambdaSchedule": EntryPoint((LambdaSchedule.__init__,), _schedule, _schedule_lower),
    "encoder_features_to_tokens": EntryPoint((encoder_features_to_tokens,), _to_tokens, _to_tokens_lower),
    "hard_timestep_weight": EntryPoint((hard_timestep_weight,), _hard, _hard_lower),
    "sigmoid_timestep_weight": EntryPoint((sigmoid_timestep_weight,), _sigmoid, _sigmoid_lower),
    "cknna": EntryPoint((cknna,), _cknna, _cknna_lower),
    "cross_frame_similarity": EntryPoint((cross_frame_similarity,), _similarity, _similarity_lower),
    "temporal_smoothness": EntryPoint((temporal_smoothness,), _smoothness, _smoothness_lower),
}
CASES = {
    "cross_frame_align_loss": LOSS_CASES,
    "CrossFrameAlignLoss": LOSS_CASES,
    "CrossFrameAlignFunction.apply": LOSS_CASES,
    "CrossFrameAlignFunction.apply[cpu]": LOSS_CASES,
    "CrossFrameAlignFunction.apply[triton]": LOSS_CASES,
    "CrepaRegularizer": REGULARIZER_CASES,
    "CrepaTransformer": TRANSFORMER_CASES,
    "token_relation_loss": RELATION_CASES,
    "TokenRelationLoss": RELATION_CASES,
    "TokenRelationFunction.apply": RELATION_CASES,
    "TokenRelationFunction.apply[cpu]": RELATION_CASES,
    "TokenRelationFunction.apply[triton]": RELATION_CASES,
    "alignment_regularizer": RELATION_REGULARIZER_CASES,
    "adapter_for": ENCODER_CASES,
    "build_feature_cache": CACHE_CASES,
    "LambdaSchedule": SCHEDULE_CASES,
    "encoder_features_to_tokens": TOKEN_CASES,
    "hard_timestep_weight": {"threshold": dict(threshold=0.3)},  # t = 0.3 exactly: included
    "sigmoid_timestep_weight": {"center": dict(center=0.3), "sharpness": dict(sharpness=3.0)},
    # chunk sizes bound memory: the same numbers by design, so only the equality one level down is checked
    "cknna": {"topk": dict(topk=4), "chunk_size": dict(chunk_size=5, _same_as_default=True)},
    "cross_frame_similarity": {"num_frames": dict(num_frames=SHAPE[1], _flat=True), "eps": dict(eps=LOSS_EPS),
                               "chunk_size": dict(chunk_size=2, _same_as_default=True)},
    "temporal_smoothness": {"num_frames": dict(num_frames=SHAPE[1], _flat=True)},
}
# options that change no value an entry point returns, with the reason; everything else needs a case
EXEMPT = {
    ("build_feature_cache", "total"): "the progress bar's length only",
    ("build_feature_cache", "progress"): "whether a progress bar is drawn, nothing stored",
    ("LambdaSchedule", "process_group"): "needs several processes: tests/test_wiring_distributed.py",
}


def _generated():
    for entry_name, entry in ENTRY_POINTS.items():
        for option in options_of(entry):
            if (entry_name, option) in EXEMPT:
                continue
            cases = CASES[entry_name].get(option)
            if cases is None:
                yield pytest.param(entry_name, option, None, id=f"{entry_name}-{option}-NO-CASE")
                continue
            for i, case in enumerate(cases if isinstance(cases, list) else [cases]):
                yield pytest.param(entry_name, option, case, id=f"{entry_name}-{option}-{i}")


@pytest.mark.parametrize("entry_name,option,case", list(_generated()))
def test_option_reaches_the_computation(entry_name, option, case):
    assert case is not None, (f"{entry_name}: the option {option!r} has no case in tests/test_wiring.py: add a "
                              f"non-default value to CASES (or a reason to EXEMPT)")
    entry = ENTRY_POINTS[entry_name]
    arguments = {**entry.common, **case}
    base = {**entry.common, **{k: v for k, v in case.items() if k != option}}
    raises = arguments.pop("_raises", False)
    same_as_default = arguments.pop("_same_as_default", False)
    got, expected = outcome(entry.run, arguments), outcome(entry.lower, arguments)
    assert raises == (expected.error is not None), f"one level down: {describe(expected)}"
    assert same(got, expected), (f"{entry_name}({option}={case[option]!r}) gives {describe(got)}; the same call one "
                                 f"level down gives {describe(expected)}")
    assert same_as_default or not same(got, outcome(entry.run, base)), (
        f"{entry_name}: {option}={case[option]!r} changes nothing on this input, so the case cannot see it dropped")


def test_every_option_has_a_case_and_no_case_is_stale():
    """The registry follows the signatures: an option without a case fails above; a case for an option that no
    longer exists fails here."""
    for entry_name, entry in ENTRY_POINTS.items():
        options = set(options_of(entry))
        stale = set(CASES[entry_name]) - options
        assert not stale, f"{entry_name}: cases for options it does not have: {sorted(stale)}"
    assert all(option in options_of(ENTRY_POINTS[name]) for name, option in EXEMPT)
