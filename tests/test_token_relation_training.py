"""The TRD regulariser (crepa_kernels.training.relation_regularizer) and examples/train_dit.py --loss trd in
lockstep with the reference."""
import dataclasses
import math

import pytest
import torch

from crepa_kernels import token_relation_loss
from crepa_kernels.relation_function import relation_backend_reason
from crepa_kernels.training.regularizer import CrepaRegularizer
from crepa_kernels.training.relation_regularizer import TokenRelationRegularizer, alignment_regularizer

pytest.importorskip("diffusers")
from test_training import SMALL, _assert_within_tolerance, trainer  # noqa: E402


@pytest.mark.parametrize("pairs", ["all", "spatial", "temporal"])
def test_regularizer_is_lambda_times_the_trd_mean(pairs):
    torch.manual_seed(0)
    regularizer = alignment_regularizer(12, 6, loss="trd", pairs=pairs, margin=0.05, loss_weight=0.3,
                                        backend="reference", projector="linear").double()
    assert isinstance(regularizer, TokenRelationRegularizer)
    hidden = torch.randn(2, 3 * 4, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    out = regularizer(hidden, target)
    proj = regularizer.projector(hidden).unflatten(1, (3, 4))
    expected = token_relation_loss(proj, target, pairs=pairs, margin=0.05, backend="reference")
    torch.testing.assert_close(out.align_loss, expected.detach())
    torch.testing.assert_close(out.loss, 0.3 * expected)
    self_cosine = torch.nn.functional.cosine_similarity(proj, target, dim=-1).mean()
    torch.testing.assert_close(out.self_similarity, self_cosine.detach())
    assert out.neighbor_similarity is None
    (grad,) = torch.autograd.grad(out.loss, hidden)
    (expected_grad,) = torch.autograd.grad(0.3 * expected, hidden)
    torch.testing.assert_close(grad, expected_grad)


def test_factory_and_bad_options():
    assert type(alignment_regularizer(8, 4)) is CrepaRegularizer
    with pytest.raises(ValueError, match="loss: expected one of"):
        alignment_regularizer(8, 4, loss="repa")
    with pytest.raises(ValueError, match="pairs and margin are options of loss='trd'"):
        alignment_regularizer(8, 4, margin=0.1)
    with pytest.raises(ValueError, match="pairs"):
        TokenRelationRegularizer(8, 4, pairs="frames")
    with pytest.raises(ValueError, match="margin"):
        TokenRelationRegularizer(8, 4, margin=-1.0)


TRD = dataclasses.replace(SMALL, loss="trd", pairs="temporal", margin=0.02)


def test_train_dit_loss_trd_lockstep_cpu_backend_matches_reference():
    if relation_backend_reason("cpu", torch.device("cpu")) is not None:
        pytest.skip("the cpu backend is unavailable here")
    reference = trainer.train(TRD, "reference")
    fused = trainer.train(TRD, "cpu")
    for record in fused.records:
        assert all(math.isfinite(record[k]) for k in ("loss", "align_loss", "grad_norm", "projector_grad_norm"))
        assert record["align_loss"] > 0
    _assert_within_tolerance(trainer.compare(reference, fused, trainer.TOLERANCES[torch.float32]))
    # and the check can fail: a margin moved by 1% is seen
    moved = trainer.train(dataclasses.replace(TRD, margin=0.0202), "reference")
    report = trainer.compare(reference, moved, trainer.TOLERANCES[torch.float32])
    assert not all(entry["ok"] for entry in report.values())


def test_train_dit_command_line_takes_loss_trd():
    config, _ = trainer._parse(["--loss", "trd", "--pairs", "spatial", "--margin", "0.1"])
    assert (config.loss, config.pairs, config.margin) == ("trd", "spatial", 0.1)
    with pytest.raises(ValueError, match="loss: expected 'crepa' or 'trd'"):
        trainer.build_model(dataclasses.replace(SMALL, loss="gram"), "reference", torch.device("cpu"), 48)
