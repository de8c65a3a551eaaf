"""What the CREPA alignment loss is: argument checks, input shapes and the frame-neighbour structure.

Every backend receives inputs that passed through here, so it can rely on:
  * ``proj`` and ``target`` shaped [B, F, N, D] (views; possibly non-contiguous), same shape and device,
    floating dtypes (possibly different from each other), no empty dimension;
  * a validated, hashable :class:`LossOptions`;
  * the call's coefficient table (:func:`coefficient_table`), the one place the neighbour weights are computed:
    no kernel computes a weight of its own.

A backend returns the per-frame loss L[b, f] of shape [B, F]; the reduction is applied by the API.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

NEIGHBOR_MODES = ("adjacent", "cumulative")
REDUCTIONS = ("mean", "frame_sum", "none")
# w(delta) for delta = |k - f| >= 1, with tau as the scale; a 1-D tensor of w[1..d] sets them by hand
WEIGHT_PROFILES = ("exponential", "gaussian")


@dataclass(frozen=True)
class LossOptions:
    """The options of one loss call, validated on construction.

    ``clamp_neighbors`` uses d = min(neighbors, F - 1) on each call (:meth:`for_frames`), as SimpleTuner's
    CrepaRegularizer and takenoko's CrepaHelper do: with d >= F the adjacent pair becomes the frames at distance
    F - 1 instead of being dropped.

    ``weights`` is "exponential" (w = exp(-delta / tau)), "gaussian" (w = exp(-delta^2 / (2 tau^2)): tau is the
    width) or the per-distance weights w[1..neighbors] by hand, given as a 1-D tensor (or sequence) and kept as a
    tuple of floats, so that the options stay hashable; tau is then unused.
    """
    tau: float = 1.0
    neighbors: int = 1
    neighbor_mode: str = "adjacent"
    normalize_weights: bool = False
    reduction: str = "mean"
    eps: float = 1e-12
    weights: str | tuple[float, ...] = "exponential"
    clamp_neighbors: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str):
            object.__setattr__(self, "weights", weight_profile(self.weights))
        check_options(self)

    def for_frames(self, num_frames: int) -> LossOptions:
        """The options of a call on clips of ``num_frames`` frames: with clamp_neighbors, neighbors clamped to
        num_frames - 1 (and a hand-set profile cut to match); else these options."""
        if not self.clamp_neighbors or self.neighbors <= num_frames - 1:
            return self
        weights = self.weights if isinstance(self.weights, str) else self.weights[:num_frames - 1]
        return dataclasses.replace(self, neighbors=num_frames - 1, weights=weights)

    def offsets(self, num_frames: int) -> tuple[int, ...]:
        """Non-zero frame offsets k - f that can land inside [0, num_frames), in increasing order."""
        d = self.neighbors
        if self.neighbor_mode == "adjacent":
            return (-d, d) if 0 < d < num_frames else ()
        d = min(d, num_frames - 1)
        return tuple(range(-d, 0)) + tuple(range(1, d + 1))

    def weight(self, offset: int) -> float:
        """w(|k - f|) for a non-zero offset k - f, as the coefficient table holds it before normalisation."""
        return neighbour_weights(self, abs(offset), _python_exp)

    def frame_coefficients(self, num_frames: int) -> list[list[float]]:
        """C[f][k]: how much cos(p_f, y_k) counts in L[f] (before the -1/N token mean), as a dense [F][F] list.

        C[f][f] = 1 / Z_f and C[f][k] = w(|k - f|) / Z_f for k in K(f); zero elsewhere: the values of
        :func:`coefficient_table`, laid out by frame instead of by band slot, as Python numbers (the distributed
        plan and the regulariser's figures read them on the host, also while torch.compile traces).
        """
        rows = _table_rows(self, num_frames)
        offsets = band_offsets(self, num_frames)
        coefficients = []
        for f in range(num_frames):
            row = [0.0] * num_frames
            for slot, offset in enumerate(offsets):
                if 0 <= f + offset < num_frames:
                    row[f + offset] = rows[f][slot]
            coefficients.append(row)
        return coefficients


def weight_profile(weights) -> tuple[float, ...]:
    """A hand-set per-distance profile w[1..d] (1-D tensor or sequence of numbers) as a tuple of Python floats:
    finite, non-negative, not requiring grad (the loss passes no gradient to its weights). Read on the host once,
    where the options are built (a CUDA tensor costs one copy there)."""
    if isinstance(weights, torch.Tensor):
        if weights.requires_grad:
            raise ValueError("weights: expected a tensor that does not require grad (the loss gives its weights no "
                             "gradient), got one with requires_grad=True; pass weights.detach()")
        if weights.dim() != 1 or weights.dtype.is_complex or weights.dtype == torch.bool:
            raise ValueError(f"weights: expected a 1-D real tensor of per-distance weights w[1..d], got "
                             f"{weights.dim()}-D {weights.dtype} of shape {tuple(weights.shape)}")
        values = weights.detach().to("cpu", torch.float64).tolist()
    elif isinstance(weights, (tuple, list)):
        values = list(weights)
    else:
        raise TypeError(f"weights: expected one of {WEIGHT_PROFILES} or a 1-D tensor of per-distance weights "
                        f"w[1..d], got {type(weights).__name__} {weights!r}")
    for value in values:
        if not _is_real_number(value) or isinstance(value, (torch.SymInt, torch.SymFloat)):
            raise TypeError(f"weights: expected numbers, got {type(value).__name__} {value!r} in {weights!r}")
        if not (value >= 0 and value < math.inf):
            raise ValueError(f"weights: expected finite non-negative weights, got {value!r} in {tuple(values)}")
    return tuple(float(value) for value in values)


def neighbour_weights(options: LossOptions, distances, exp=torch.exp):
    """w(delta), the one definition of every weighting, at ``distances`` >= 1: an fp64 tensor with exp=torch.exp,
    or one Python number with exp=_python_exp."""
    if options.weights == "exponential":
        return exp(-distances / options.tau)
    if options.weights == "gaussian":
        scaled = distances / options.tau  # tau once, alone: under torch.compile a product of SymFloats is pinned
        return exp(-(scaled * scaled) / 2)
    if isinstance(distances, torch.Tensor):
        return torch.tensor(options.weights, dtype=torch.float64)[distances.long() - 1]
    return options.weights[distances - 1]


def _python_exp(x):
    # the C library's exp, as the kernels computed it before the table; while torch.compile traces, e ** x: math.exp
    # would pin a symbolic tau to its traced value
    return math.e ** x if torch.compiler.is_compiling() else math.exp(x)


def _table_rows(options: LossOptions, num_frames: int) -> list[list[float]]:
    """coefficient_table's values as Python numbers: per frame its slots' weights over Z_f, Z_f summed in slot
    order from the frame's own 1."""
    offsets = band_offsets(options, num_frames)
    weights = [1.0] + [neighbour_weights(options, abs(o), _python_exp) for o in offsets[1:]]
    rows = []
    for f in range(num_frames):
        row = [w if 0 <= f + o < num_frames else 0.0 for w, o in zip(weights, offsets)]
        z = 1.0
        if options.normalize_weights:
            for w in row[1:]:
                z = z + w
        rows.append([w / z for w in row])
    return rows


def band_offsets(options: LossOptions, num_frames: int) -> tuple[int, ...]:
    """The frame offsets of a frame's band slots: slot 0 is the frame itself, then options.offsets."""
    return (0, *options.offsets(num_frames))


def coefficient_table(options: LossOptions, num_frames: int, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """C[f, slot], [F, W] contiguous in ``dtype`` on ``device``: what cos(p_f, y_{f + o_slot}) counts in L[f] before
    the -1/N token mean, for the slots of band_offsets. C[f, 0] = 1 / Z_f and C[f, slot] = w(|o_slot|) / Z_f, zero
    where frame f + o_slot lies outside the clip; Z_f = 1 + the weights of frame f's slots with normalize_weights,
    else 1. Computed in fp64 and rounded once to ``dtype``; every backend reads this table, and no kernel computes
    a weight of its own.

    Eager calls with a float tau reuse one table per (options, F, dtype, device); under torch.compile it is built in
    the graph, with a symbolic tau."""
    if torch.compiler.is_compiling():
        return _traced_coefficient_table(options, num_frames, dtype, device)
    return _eager_coefficient_table(options, num_frames, dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=256)
def _eager_coefficient_table(options: LossOptions, num_frames: int, dtype: torch.dtype,
                             device: torch.device) -> torch.Tensor:
    """The rows in Python floats, exactly as frame_coefficients gives them."""
    return torch.tensor(_table_rows(options, num_frames), dtype=torch.float64).to(device=device, dtype=dtype)


def _traced_coefficient_table(options: LossOptions, num_frames: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The same formula with torch ops, part of the graph, so that tau may stay symbolic."""
    offsets = torch.tensor(band_offsets(options, num_frames), dtype=torch.float64)
    frames = torch.arange(num_frames, dtype=torch.float64)[:, None]
    lands = (frames + offsets >= 0) & (frames + offsets < num_frames)  # [F, W]
    distances = offsets.abs()[1:]
    weights = torch.cat([torch.ones(1, dtype=torch.float64), neighbour_weights(options, distances)])
    table = torch.where(lands, weights, torch.zeros((), dtype=torch.float64))
    if options.normalize_weights:
        table = table / table.sum(dim=1, keepdim=True)
    return table.to(device=device, dtype=dtype).contiguous()


def _is_real_number(value) -> bool:
    # under torch.compile a tau or eps that varies between calls arrives as a SymFloat
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def _is_positive_finite(value) -> bool:
    # comparisons, not math.isfinite: on a SymFloat they become guards instead of a graph break; NaN fails both
    return value > 0 and value < math.inf


def check_options(options: LossOptions) -> None:
    if not _is_real_number(options.tau):
        raise TypeError(f"tau: expected a positive finite number, got {type(options.tau).__name__} {options.tau!r}")
    if not _is_positive_finite(options.tau):
        raise ValueError(f"tau: expected a positive finite number, got {options.tau!r}")
    if not isinstance(options.neighbors, int) or isinstance(options.neighbors, bool):
        raise TypeError(
            f"neighbors: expected a non-negative int, got {type(options.neighbors).__name__} {options.neighbors!r}"
        )
    if options.neighbors < 0:
        raise ValueError(f"neighbors: expected a non-negative int, got {options.neighbors}")
    if options.neighbor_mode not in NEIGHBOR_MODES:
        raise ValueError(f"neighbor_mode: expected one of {NEIGHBOR_MODES}, got {options.neighbor_mode!r}")
    if not isinstance(options.normalize_weights, bool):
        raise TypeError(
            f"normalize_weights: expected a bool, got {type(options.normalize_weights).__name__} "
            f"{options.normalize_weights!r}"
        )
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {options.reduction!r}")
    if not _is_real_number(options.eps):
        raise TypeError(f"eps: expected a positive finite number, got {type(options.eps).__name__} {options.eps!r}")
    if not _is_positive_finite(options.eps):
        raise ValueError(f"eps: expected a positive finite number, got {options.eps!r}")
    if not isinstance(options.clamp_neighbors, bool):
        raise TypeError(f"clamp_neighbors: expected a bool, got {type(options.clamp_neighbors).__name__} "
                        f"{options.clamp_neighbors!r}")
    if isinstance(options.weights, str):
        if options.weights not in WEIGHT_PROFILES:
            raise ValueError(f"weights: expected one of {WEIGHT_PROFILES} or a 1-D tensor of per-distance weights "
                             f"w[1..d], got {options.weights!r}")
    elif len(options.weights) != options.neighbors:
        raise ValueError(f"weights: expected one weight per distance 1..neighbors ({options.neighbors}), got "
                         f"{len(options.weights)}")


def check_eps_for_dtype(eps, dtype: torch.dtype) -> None:
    """ValueError unless eps is at least the smallest normal number of the compute dtype (fp32: 1.2e-38, fp64:
    2.2e-308): below it eps is subnormal or 0 there, and max(|x|, eps) no longer keeps a zero vector's cosine from
    being 0 / 0. Down to it the kernels divide without underflow (csrc/crepa_math.h)."""
    smallest = torch.finfo(dtype).tiny
    if eps < smallest:
        raise ValueError(f"eps: expected at least {smallest:.4g}, the smallest normal {dtype} (the dtype these "
                         f"inputs are computed in), got {eps!r}")


def _check_num_frames(num_frames) -> None:
    if num_frames is None:
        return
    if not isinstance(num_frames, int) or isinstance(num_frames, bool):
        raise TypeError(f"num_frames: expected a positive int or None, got {type(num_frames).__name__}")
    if num_frames <= 0:
        raise ValueError(f"num_frames: expected a positive int or None, got {num_frames}")


def check_floating_tensor(name: str, x) -> None:
    """TypeError unless the argument ``name`` is a tensor of a floating-point dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point dtype, got {x.dtype}")


def frames_view(name: str, x, num_frames: int | None) -> torch.Tensor:
    """Checks one input named ``name`` and views it as [B, F, N, D]."""
    _check_num_frames(num_frames)
    check_floating_tensor(name, x)
    if x.dim() == 4:
        if num_frames is not None and x.shape[1] != num_frames:
            raise ValueError(
                f"{name}: num_frames={num_frames} disagrees with the frame dimension of shape {tuple(x.shape)} "
                "[B, F, N, D]"
            )
        frames = x
    elif x.dim() == 3:
        if num_frames is None:
            raise ValueError(
                f"{name}: a 3-D input [B, F*N, D] needs num_frames=F, got shape {tuple(x.shape)} and num_frames=None"
            )
        if x.shape[1] % num_frames != 0:
            raise ValueError(
                f"{name}: num_frames={num_frames} does not divide the token count {x.shape[1]} "
                f"of shape {tuple(x.shape)}"
            )
        frames = unchecked_frames(x, num_frames)
    else:
        raise ValueError(
            f"{name}: expected a 4-D [B, F, N, D] or 3-D [B, F*N, D] tensor, got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if frames.numel() == 0:
        raise ValueError(f"{name}: expected no empty dimension, got shape {tuple(x.shape)}")
    return frames


def unchecked_frames(x: torch.Tensor, num_frames: int | None) -> torch.Tensor:
    """The [B, F, N, D] view of an input frames_view accepts, without its checks (a call is checked once, at its
    entry point): a 3-D input is frame-major, [B, F*N, D]."""
    if x.dim() == 4:
        return x
    return x.unflatten(1, (num_frames, x.shape[1] // num_frames))


def as_frames(proj, target, num_frames: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks and reshapes both inputs to [B, F, N, D] views."""
    proj_frames = frames_view("proj", proj, num_frames)
    target_frames = frames_view("target", target, num_frames)
    if proj_frames.shape != target_frames.shape:
        raise ValueError(
            "proj and target: expected the same [B, F, N, D] shape, got "
            f"{tuple(proj_frames.shape)} and {tuple(target_frames.shape)}"
        )
    if proj_frames.device != target_frames.device:
        raise ValueError(
            f"proj and target: expected the same device, got {proj_frames.device} and {target_frames.device}"
        )
    return proj_frames, target_frames


def compute_dtype(proj: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """fp64 when either input is fp64 (so gradcheck applies), else fp32."""
    if proj.dtype == torch.float64 or target.dtype == torch.float64:
        return torch.float64
    return torch.float32


def reduce_frames(per_frame: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_frame.mean()
    if reduction == "frame_sum":
        return per_frame.sum(dim=1).mean()
    return per_frame
