"""A deliberately naive second implementation of the loss: explicit loops over b, f and k, in float64.

It shares no code with the package, so that the reference is checked against something written separately.
"""
import math

import torch


def _clamped_cosine(a, b, eps):
    # a, b: [N, D] -> [N]
    # vector_norm has the zero subgradient at 0, where sqrt would give inf * 0; a norm of exactly eps counts as
    # clamped (no gradient through the norm there), written out so that it does not depend on clamp_min's kink,
    # whose gradient changed between torch versions
    def clamped(x):
        norm = torch.linalg.vector_norm(x, dim=-1)
        return torch.where(norm > eps, norm, torch.full_like(norm, eps))

    return (a * b).sum(-1) / (clamped(a) * clamped(b))


def _neighbour_frames(f, num_frames, neighbors, mode):
    frames = []
    for k in range(num_frames):
        distance = abs(k - f)
        if mode == "adjacent" and neighbors > 0 and distance == neighbors:
            frames.append(k)
        if mode == "cumulative" and 1 <= distance <= neighbors:
            frames.append(k)
    return frames


def naive_weight(distance, tau, weights):
    """w(distance) of the weights option: "exponential", "gaussian" (tau the width) or a sequence w[1..d]."""
    if weights == "exponential":
        return math.exp(-distance / tau)
    if weights == "gaussian":
        return math.exp(-distance * distance / (2.0 * tau * tau))
    return float(weights[distance - 1])


def naive_loss(proj, target, tau=1.0, neighbors=1, neighbor_mode="adjacent", normalize_weights=False,
               reduction="mean", eps=1e-12, weights="exponential"):
    p = proj.double()
    y = target.double()
    batch, num_frames, num_tokens, _ = p.shape
    rows = []
    for b in range(batch):
        row = []
        for f in range(num_frames):
            total = _clamped_cosine(p[b, f], y[b, f], eps).sum()
            z = 1.0
            for k in _neighbour_frames(f, num_frames, neighbors, neighbor_mode):
                w = naive_weight(abs(k - f), tau, weights)
                total = total + w * _clamped_cosine(p[b, f], y[b, k], eps).sum()
                z += w
            if not normalize_weights:
                z = 1.0
            row.append(-total / num_tokens / z)
        rows.append(torch.stack(row))
    per_frame = torch.stack(rows)
    if reduction == "mean":
        return per_frame.sum() / (batch * num_frames)
    if reduction == "frame_sum":
        return per_frame.sum() / batch
    return per_frame
