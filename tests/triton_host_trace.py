"""Runs the GPU registration of the Triton ops (the torch.library.triton_op bodies) on fake CUDA tensors whose
sizes B, F, N, D and whose tau and eps are symbols of a ShapeEnv, as torch.compile traces them; no GPU needed.

Run by tests/test_triton_guards.py in a subprocess: without TRITON_INTERPRET, so that the ops are triton_ops and
wrap_triton yields the traceable launch. Reads a JSON list of cases on stdin, prints one JSON result per case:
the non-tensor kernel arguments that are floats, the fp64 one-element tensor arguments (eps), every guard the
host code installed (symbols renamed B, F, N, D, tau, eps), and for each binding of other values the guards it
fails. A case: {"dtypes": [proj, target], "options": {neighbors, neighbor_mode, normalize_weights},
"capability": [major, minor], "traced": {B, F, N, D, tau, eps}, "bindings": [{B, F, N, D, tau, eps}, ...]}.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import sympy  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.source import ConstantSource  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: E402

from crepa_kernels.ops import triton_loss, triton_plan  # noqa: E402
from crepa_kernels.spec import LossOptions, coefficient_table, compute_dtype  # noqa: E402

NAMES = ("B", "F", "N", "D", "tau", "eps")


def trace(case: dict) -> dict:
    launches = []
    run = triton_loss._run

    def record(launch, device_of):
        launches.append(launch)
        run(launch, device_of)

    env = ShapeEnv()
    symbols = {name: env.create_symbol(value, ConstantSource(name)) for name, value in case["traced"].items()}
    values = {name: (env.create_symfloatnode if isinstance(value, float) else env.create_symintnode)(
        symbols[name], hint=value) for name, value in case["traced"].items()}
    proj_dtype, target_dtype = (getattr(torch, name) for name in case["dtypes"])
    options = LossOptions(tau=values["tau"], eps=values["eps"], **case["options"])
    # torch.cuda.device and the capability query need a CUDA driver: the GPU traced for is the case's
    capability = tuple(case["capability"])
    with FakeTensorMode(shape_env=env), \
            _patched(triton_loss, _run=record, _device_guard=lambda tensor: contextlib.nullcontext()), \
            _patched(triton_plan, device_capability=lambda device: capability):
        shape = tuple(values[name] for name in "BFND")
        proj = torch.empty(shape, dtype=proj_dtype, device="cuda")
        target = torch.empty(shape, dtype=target_dtype, device="cuda")
        # the backend's entry points, as CrossFrameAlignFunction calls them, with the call's coefficient table built
        # as under torch.compile (with torch ops: tau symbolic); they build the ops' eps
        with _patched(torch.compiler, is_compiling=lambda: True):
            table = coefficient_table(options, shape[1], compute_dtype(proj, target), proj.device)
        loss, *saved = triton_loss.forward(proj, target, table, options)
        for target_grad in (True, False):
            triton_loss.backward(torch.empty_like(loss), proj, target, table, tuple(saved), options, True,
                                 target_grad)
    names = {symbol: sympy.Symbol(name) for name, symbol in symbols.items()}
    guards = [guard.expr for guard in env.guards]
    return {
        "kernels": [launch.kernel.fn.__name__ for launch in launches],
        "float_args": [f"{launch.kernel.fn.__name__} argument {index}: {arg}" for launch in launches
                       for index, arg in enumerate((*launch.args, *launch.kwargs.values()))
                       if isinstance(arg, (float, torch.SymFloat))],
        "scalar_tensors": [sum(map(_is_scalar_tensor, launch.args)) for launch in launches],
        "guards": [str(guard.xreplace(names)) for guard in guards],
        "failed": [[str(guard.xreplace(names)) for guard in guards if not _holds(guard, symbols, binding)]
                   for binding in case["bindings"]],
    }


def _is_scalar_tensor(arg) -> bool:
    # a concrete numel only: comparing a symbolic one would install a guard
    return isinstance(arg, torch.Tensor) and arg.dtype == torch.float64 and type(arg.numel()) is int \
        and arg.numel() == 1


def _holds(guard, symbols: dict, binding: dict) -> bool:
    return bool(guard.xreplace({symbols[name]: sympy.sympify(binding[name]) for name in NAMES}))


@contextlib.contextmanager
def _patched(module, **attributes):
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


if __name__ == "__main__":
    for case in json.load(sys.stdin):
        print(json.dumps(trace(case)), flush=True)
