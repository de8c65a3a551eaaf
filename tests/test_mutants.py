"""The mutant list of `make mutate` (tools/mutants.py) still applies to the code: each original text is found
exactly once in its file, so refactors cannot silently turn mutants into no-ops. The mutation run itself is too
slow for CI (docs/testing.md)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from mutants import COVERING_TESTS, MUTANTS  # noqa: E402
from mutate import check_applies  # noqa: E402


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda mutant: mutant.name)
def test_mutant_applies_exactly_once(mutant):
    check_applies(mutant, ROOT)


def test_mutants_are_many_named_once_and_spread_over_the_code():
    names = [mutant.name for mutant in MUTANTS]
    assert len(names) == len(set(names)) and len(names) >= 40
    mutated = {mutant.path for mutant in MUTANTS}
    for required in ("crepa_kernels/spec.py", "crepa_kernels/reference.py", "crepa_kernels/ops/triton_loss.py",
                     "csrc/crepa_cpu.cpp", "csrc/crepa_math.h", "crepa_kernels/training/token_grid.py"):
        assert required in mutated, f"no mutant in {required}"


def test_covering_tests_exist():
    for path, selection in COVERING_TESTS.items():
        assert (ROOT / path).is_file(), path
        test_files = [arg for arg in selection if arg.startswith("tests/")]
        assert test_files and all((ROOT / name.split("::")[0]).is_file() for name in test_files), selection
