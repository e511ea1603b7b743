"""Shared test set-up: the Triton interpreter on CPU, markers, small helpers."""
import os

import pytest
import torch

# Two shared cores: more threads than that spin-wait against each other and against the
# worker subprocesses some tests start (which inherit the variable).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter (fp32 math).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
