import os
import sys

import pytest
import torch

# Triton kernels run in the interpreter on CPU-only machines. It must be set before any test module
# imports influx (and with it triton-decorated code), so it lives in the root conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Make tests/utils.py importable as `utils` and keep CPU runs small and deterministic.
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
