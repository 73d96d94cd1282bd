"""Shared test fixtures.

``shared_data`` is the folder of real data files (``../shared/data`` beside the repository, or
``$LIT_DIVNORM_SHARED_DATA``); tests that use it skip with a reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton's kernels then run in its interpreter, on the CPU;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before anything imports triton

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("LIT_DIVNORM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set LIT_DIVNORM_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["native", "torch"])
def native_or_torch(request, monkeypatch) -> str:
    """Run a test with the C++ kernels of :mod:`lit_divnorm.norm.kernels.cpu` and without them
    (their eager PyTorch counterparts, the path CUDA tensors take), by name."""
    from lit_divnorm.norm.kernels import cpu

    if request.param == "native":
        if not cpu.available():
            pytest.skip("the C++ kernels could not be built here (no compiler)")
    else:
        monkeypatch.setattr(cpu, "available", lambda: False)
    return request.param
