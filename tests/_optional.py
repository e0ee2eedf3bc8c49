"""Optional test dependencies imported where a test uses them, not when its module is imported:
a module mixing closed-form tests with parity tests keeps its closed-form tests when diffusers is
missing, and only the parity tests skip (``pytest.importorskip`` at first use, inside the test)."""

from __future__ import annotations

import pytest


class _Lazy:
    """A stand-in for a module: the first attribute read imports it or skips the running test."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_") or attr in _PYTEST_PROBES:  # pytest inspects module attributes when it collects
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name), attr)


_PYTEST_PROBES = frozenset({"pytestmark", "pytest_plugins", "setup_module", "teardown_module", "setUpModule",
                            "tearDownModule", "setup", "teardown"})


diffusers = _Lazy("diffusers")
k_diffusion = _Lazy("k_diffusion")
