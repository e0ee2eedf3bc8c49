"""Fixtures shared by several test folders; each conftest.py that wants them imports them by name
(a fixture, autouse ones included, applies only where it is imported, unlike tests/conftest.py)."""

import os
import random

import pytest


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run (printed, so a failure can be replayed with FASTDIFF_TEST_SEED)."""
    s = int(os.environ.get("FASTDIFF_TEST_SEED", random.randrange(2**31)))
    print(f"seed={s}")
    return s


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors and small models: intra-op threads only add spin-wait, badly so on a loaded
    2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
