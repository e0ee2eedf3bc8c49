"""Fixtures for the zoo tests."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models: intra-op threads only add spin-wait, badly so on a loaded 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
