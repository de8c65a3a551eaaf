import os
import sys
from pathlib import Path

import torch

# Triton decides at kernel definition (import) time whether to interpret; without a GPU the Triton tests run
# under the interpreter, so it must be on before any test module imports crepa_kernels.ops.triton_loss.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
