"""Fixtures for the zoo tests: one intra-op thread."""

from ..._fixtures import _one_thread  # noqa: F401  (a fixture, found by name)
