"""Views of token ranges of one tensor whose backward writes one gradient, not one per view.

Autograd's backward of ``x[:, a:b]`` is a zero-filled tensor of x's full size with the slice's gradient copied in,
summed with every other slice's: for a shard read by a handful of kernel calls that is several full-size fills and
additions, more than the kernels' own work. Here the views come from one node whose backward fills one buffer and
adds each view's gradient into its own range.
"""
from __future__ import annotations

import torch


class _TokenRanges(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ranges: tuple[tuple[int, int], ...]):
        ctx.ranges, ctx.shape = ranges, x.shape
        return tuple(x[:, start:end] for start, end in ranges)

    @staticmethod
    def backward(ctx, *grads):
        given = sorted(((end - start, start, end, g) for (start, end), g in zip(ctx.ranges, grads) if g is not None),
                       key=lambda item: item[0], reverse=True)
        _, first_start, first_end, first = given[0]  # the largest range is copied, not added to zeros
        grad = first.new_empty(ctx.shape)
        grad[:, :first_start].zero_()
        grad[:, first_end:].zero_()
        grad[:, first_start:first_end] = first
        for _, start, end, g in given[1:]:
            grad[:, start:end] += g
        return grad, None


def token_range_views(x: torch.Tensor, ranges: tuple[tuple[int, int], ...]) -> dict[tuple[int, int], torch.Tensor]:
    """{(start, end): x[:, start:end]} for each range along dim 1, differentiable through one node."""
    if not ranges:
        return {}
    return dict(zip(ranges, _TokenRanges.apply(x, ranges)))
