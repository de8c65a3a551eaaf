"""Where each rank's shard of the frame-major sequence sits, and how one rank computes its share of the loss.

Pure Python on integers: every rank derives the same plan for every rank, so the halo exchange needs no
negotiation and no host synchronisation.

The loss of frame f is a mean over its N tokens of per-token terms, and token n of frame f only meets token n of
frames f + offset in the target. A rank holding tokens [start, end) of the flattened sequence cuts them into
pieces (a partial first frame, a run of whole frames, a partial last frame) and, per piece,
  * runs the fused loss once on the piece as it is, with the target of the same frames: exact for every frame whose
    neighbours all lie inside the piece ("exact" frames);
  * for the other frames (at most max|offset| at each end of the piece), adds single-offset terms
    C[f][f + offset] * mean_n cos(p[f, n], y[f + offset, n]), each a fused REPA* (d = 0) call on views: only for
    the neighbours outside the piece without normalize_weights (the fused call already weights the ones inside it
    exactly), for every neighbour with it (C[f] then depends on all of f's neighbours).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..spec import LossOptions


def cached(function):
    """functools.lru_cache in eager mode; under torch.compile the plain function, which Dynamo traces to constants
    (it would ignore the cache anyway, with a warning)."""
    with_cache = functools.lru_cache(maxsize=256)(function)

    @functools.wraps(function)
    def call(*args):
        return function(*args) if torch.compiler.is_compiling() else with_cache(*args)

    return call


@dataclass(frozen=True)
class SequenceLayout:
    """A sequence of ``num_frames`` x ``tokens_per_frame`` tokens split in rank order into shards of ``shard_sizes``
    tokens; tokens past the end of the sequence are padding (only the last shards can hold any)."""

    num_frames: int
    tokens_per_frame: int
    shard_sizes: tuple[int, ...]

    @property
    def seq_len(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def world_size(self) -> int:
        return len(self.shard_sizes)

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The real (unpadded) tokens [start, end) of the sequence that ``rank`` holds, at its local positions 0..."""
        start = min(sum(self.shard_sizes[:rank]), self.seq_len)
        return start, min(start + self.shard_sizes[rank], self.seq_len)


@dataclass(frozen=True)
class Piece:
    """Tokens [first_token, end_token) of each of frames [first_frame, end_frame), held contiguously by a rank from
    its local token ``local_start`` on. Either a single frame or whole frames, so the piece is one flat range."""

    first_frame: int
    end_frame: int
    first_token: int
    end_token: int
    local_start: int

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.first_frame

    @property
    def tokens(self) -> int:
        return self.end_token - self.first_token


@dataclass(frozen=True)
class Term:
    """coefficient * mean over the piece's tokens of cos(p[f, n], y[f + offset, n]) for frames [first, end)."""

    first_frame: int
    end_frame: int
    offset: int
    coefficient: float


@dataclass(frozen=True)
class PiecePlan:
    piece: Piece
    exact: tuple[bool, ...]  # per frame of the piece: the fused call on the piece alone is exact
    terms: tuple[Term, ...]  # single-offset terms that make up (or complete) the non-exact frames
    # the fused call's value counts for every frame, the terms adding only the neighbours outside the piece: true
    # without normalize_weights, where C[f][k] = w(|k - f|) does not depend on which neighbours exist, so the call on
    # the piece alone weights its in-piece pairs exactly as the whole sequence does
    fused_everywhere: bool = False

    @property
    def fused(self) -> bool:
        """Whether the piece runs the fused call at all."""
        return self.fused_everywhere or any(self.exact)


def split_into_pieces(start: int, end: int, tokens_per_frame: int) -> list[Piece]:
    """Tokens [start, end) of the flattened sequence as at most three pieces: partial head, whole frames, partial tail."""
    n = tokens_per_frame
    pieces = []
    position = start
    while position < end:
        frame, token = divmod(position, n)
        if token == 0 and end - position >= n:  # a run of whole frames
            frames = (end - position) // n
            pieces.append(Piece(frame, frame + frames, 0, n, position - start))
            position += frames * n
        else:  # part of one frame
            stop = min(end, (frame + 1) * n)
            pieces.append(Piece(frame, frame + 1, token, stop - frame * n, position - start))
            position = stop
    return pieces


@cached
def _coefficients(options: LossOptions, num_frames: int) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(row) for row in options.frame_coefficients(num_frames))


def _neighbour_frames(options: LossOptions, num_frames: int, frame: int) -> list[int]:
    return [frame + o for o in options.offsets(num_frames) if 0 <= frame + o < num_frames]


def plan_piece(piece: Piece, options: LossOptions, num_frames: int) -> PiecePlan:
    exact = tuple(
        all(piece.first_frame <= k < piece.end_frame for k in _neighbour_frames(options, num_frames, f))
        for f in range(piece.first_frame, piece.end_frame)
    )
    coefficients = _coefficients(options, num_frames)
    fused_everywhere = not options.normalize_weights

    def needs_term(f: int, offset: int) -> bool:
        if exact[f - piece.first_frame] or not 0 <= f + offset < num_frames:
            return False
        return not (fused_everywhere and piece.first_frame <= f + offset < piece.end_frame)

    terms = []
    for offset in (0,) + options.offsets(num_frames):
        run = []  # consecutive non-exact frames with a neighbour at this offset and the same coefficient
        for f in range(piece.first_frame, piece.end_frame):
            usable = needs_term(f, offset)
            coefficient = coefficients[f][f + offset] if usable else None
            if run and (coefficient is None or coefficient != run[-1][1]):
                terms.append(Term(run[0][0], run[-1][0] + 1, offset, run[0][1]))
                run = []
            if coefficient is not None:
                run.append((f, coefficient))
        if run:
            terms.append(Term(run[0][0], run[-1][0] + 1, offset, run[0][1]))
    return PiecePlan(piece, exact, tuple(terms), fused_everywhere)


@cached
def plan_rank(layout: SequenceLayout, rank: int, options: LossOptions) -> tuple[PiecePlan, ...]:
    start, end = layout.shard_range(rank)
    return tuple(
        plan_piece(piece, options, layout.num_frames)
        for piece in split_into_pieces(start, end, layout.tokens_per_frame)
    )


def piece_range(piece: Piece, first_frame: int, end_frame: int) -> tuple[int, int]:
    """The rank's local tokens [start, end) of frames [first_frame, end_frame) of a piece."""
    start = piece.local_start + (first_frame - piece.first_frame) * piece.tokens
    return start, start + (end_frame - first_frame) * piece.tokens


def call_ranges(plans) -> tuple[tuple[int, int], ...]:
    """The local token ranges of proj the fused calls of a rank's plan read, each once, in order of first use."""
    ranges = []
    for plan in plans:
        piece = plan.piece
        if plan.fused:
            ranges.append(piece_range(piece, piece.first_frame, piece.end_frame))
        ranges += [piece_range(piece, term.first_frame, term.end_frame) for term in plan.terms]
    return tuple(dict.fromkeys(ranges))


def term_target_range(piece: Piece, term: Term, tokens_per_frame: int) -> tuple[int, int]:
    """The target tokens [start, end) of the flattened sequence a term reads: one flat range (see Piece)."""
    n = tokens_per_frame
    first = (term.first_frame + term.offset) * n + piece.first_token
    last = (term.end_frame - 1 + term.offset) * n + piece.end_token
    return first, last


def merge_ranges(ranges) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def intersect(ranges, start: int, end: int) -> list[tuple[int, int]]:
    clipped = ((max(a, start), min(b, end)) for a, b in ranges)
    return [(a, b) for a, b in clipped if a < b]


def subtract(ranges, start: int, end: int) -> list[tuple[int, int]]:
    """``ranges`` without [start, end)."""
    out = []
    for a, b in ranges:
        out += [(a, min(b, start))] if a < min(b, start) else []
        out += [(max(a, end), b)] if max(a, end) < b else []
    return out


@cached
def halo_ranges(layout: SequenceLayout, rank: int, options: LossOptions) -> tuple[tuple[int, int], ...]:
    """The target tokens ``rank`` reads but does not hold, merged and sorted: its halo in the sharded-target mode."""
    needed = [
        term_target_range(plan.piece, term, layout.tokens_per_frame)
        for plan in plan_rank(layout, rank, options)
        for term in plan.terms
        if term.offset != 0
    ]
    return tuple(subtract(merge_ranges(needed), *layout.shard_range(rank)))


@dataclass(frozen=True)
class HaloExchange:
    """What one rank sends to and receives from every rank (token ranges of the sequence, in rank order)."""

    send: tuple[tuple[tuple[int, int], ...], ...]
    receive: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def empty(self) -> bool:
        return not any(self.send) and not any(self.receive)


@cached
def halo_exchange(layout: SequenceLayout, rank: int, options: LossOptions) -> HaloExchange:
    own = layout.shard_range(rank)
    send, receive = [], []
    for other in range(layout.world_size):
        if other == rank:
            send.append(())
            receive.append(())
            continue
        send.append(tuple(intersect(halo_ranges(layout, other, options), *own)))
        receive.append(tuple(intersect(halo_ranges(layout, rank, options), *layout.shard_range(other))))
    return HaloExchange(tuple(send), tuple(receive))


def any_halo(layout: SequenceLayout, options: LossOptions) -> bool:
    """Whether any rank needs a halo (the same answer on every rank, so all skip or all join the exchange)."""
    return any(halo_ranges(layout, rank, options) for rank in range(layout.world_size))
