"""The package's floors, checked on its source: nothing below imports from above (lazy imports inside functions
included, since they hide a loop from the module structure rather than remove it)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "crepa_kernels"

# ground up: what the loss is; its kernels; backend selection; the autograd wiring; the API forms; the trainer
# side; distributed. A module may import its own floor and the floors below.
FLOORS = [
    ("spec", {"spec", "relation_spec", "reference", "relation_reference", "gpu_limits"}),
    ("ops", {"ops"}),
    ("selection", {"backends"}),
    ("autograd", {"function", "relation_function"}),
    ("forms", {"api", "module", "relation_api", "diagnostics", "__init__"}),
    ("trainer", {"training"}),
    ("distributed", {"distributed"}),
]


def _floor(module: str) -> int:
    """The floor of a dotted module name inside the package ("ops.reference", "training.regularizer", ...)."""
    head = module.split(".")[0]
    for index, (_, members) in enumerate(FLOORS):
        if head in members:
            return index
    raise AssertionError(f"crepa_kernels.{module} belongs to no floor: add it to FLOORS")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module relative to the package) for every import of the package in the file."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    package = list(relative.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.startswith("crepa_kernels."):
                names = [node.module.removeprefix("crepa_kernels.")]
            else:
                continue
            found += [(node.lineno, name) for name in names if name]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.removeprefix("crepa_kernels."))
                      for a in node.names if a.name.startswith("crepa_kernels.")]
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_floor_above_it(path):
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    own = _floor(module)
    for line, imported in _imports(path):
        if imported in ("", "_C"):  # the package itself (a version string), or the compiled extension
            continue
        assert _floor(imported) <= own, (
            f"crepa_kernels/{path.relative_to(PACKAGE)}:{line} imports crepa_kernels.{imported} "
            f"({FLOORS[_floor(imported)][0]}), above its own floor ({FLOORS[own][0]})")


def test_the_backends_live_on_the_ops_floor():
    from crepa_kernels.backends import BACKEND_MODULES

    for name, module in BACKEND_MODULES.items():
        assert module.startswith("crepa_kernels.ops."), (name, module)
