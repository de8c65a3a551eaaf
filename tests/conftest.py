import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# A fresh Inductor cache per test session: cached graphs do not notice a changed custom-op signature
# (pytorch/pytorch#144344), so a cache left by an older build of the extension can replay stale calls.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="crepa-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

# Triton decides at kernel definition (import) time whether to interpret; without a GPU the Triton tests run
# under the interpreter, so it must be on before any test module imports crepa_kernels.ops.triton_loss.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
