"""The CUDA tests (marker ``gpu``): on a machine with a CUDA GPU they run there; elsewhere they skip,
unless ``PREFTUNE_GPU_TESTS_ON_CPU=1`` asks for them on the CPU, as ``bench/device_check.sh --dry-run``
does, so that their code has run once before a lent GPU's minutes are spent on it.

Run them: ``python -m pytest -m gpu tests/gpu`` (bench/device_check.sh runs them on a lent GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU = "PREFTUNE_GPU_TESTS_ON_CPU"
ONE_EACH = "PREFTUNE_GPU_TESTS_ONE_EACH"  # the dry run: the first case of each test function only


def pytest_collection_modifyitems(config, items):
    """With ``PREFTUNE_GPU_TESTS_ONE_EACH=1`` (the dry run, on the CPU), only the first parameter case of
    each test function here runs: every line of test code once, in a fraction of the time."""
    if os.environ.get(ONE_EACH) != "1":
        return
    here = os.path.dirname(__file__)
    seen, keep, drop = set(), [], []
    for item in items:
        if not str(item.fspath).startswith(here):
            keep.append(item)
            continue
        key = (str(item.fspath), getattr(item, "originalname", item.name))
        (drop if key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def selected_device() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(ON_CPU) == "1":
        return torch.device("cpu")
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    chosen = selected_device()
    if chosen is None:
        pytest.skip(f"needs a CUDA GPU ({ON_CPU}=1 runs it on the CPU: bench/device_check.sh --dry-run)")
    return chosen


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """fp32 means fp32: no TF32 matrix products (torch's default, asserted rather than assumed)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (METHOD.md's measure)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
