"""Fixtures for integration tests: a fresh random seed per test (reported), one intra-op thread."""

from .._fixtures import _one_thread, seed  # noqa: F401  (fixtures, found by name)
