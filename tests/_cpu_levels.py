"""Fixtures and helpers shared by the tests of the compiled CPU kernel (fastdiff._C): a fresh
random generator per test, and the SIMD levels this CPU can run. Import them by name."""

import os

import pytest
import torch

LEVELS = ("scalar", "avx2", "avx512", "avx512bf16")
_RANK = {name: i for i, name in enumerate(LEVELS)}


def available_levels(_C) -> list[str]:
    """The SIMD levels of ``LEVELS`` that this CPU supports."""
    return [lv for lv in LEVELS if _RANK[lv] <= _RANK[_C.detected_simd_level()]]


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=LEVELS)
def level(request):
    """Run the test with the kernel forced to one SIMD level (skipped if this CPU lacks it)."""
    from fastdiff.backends.cpu import _C

    if request.param not in available_levels(_C):
        pytest.skip(f"this CPU does not support {request.param} (best: {_C.detected_simd_level()})")
    old = _C.simd_level()
    _C.set_simd_level(request.param)
    yield request.param
    _C.set_simd_level(old)
