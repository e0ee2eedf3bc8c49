"""Old module paths that keep working after the package restructuring.

``import fastdiff.schedules`` (or ``from fastdiff.ops import step``) still gives the module now at
``fastdiff.core.schedules`` (``fastdiff.runtime.ops``): the same module object under both names,
imported on first use. New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

#: old dotted path -> new dotted path
MOVED = {
    "fastdiff.plan": "fastdiff.core.plan",
    "fastdiff.args": "fastdiff.core.args",
    "fastdiff.schedules": "fastdiff.core.schedules",
    "fastdiff.rng": "fastdiff.core.rng",
    "fastdiff.guidance": "fastdiff.core.guidance",
    "fastdiff.validate": "fastdiff.core.validate",
    "fastdiff.plans": "fastdiff.samplers.plans",
    "fastdiff.ops": "fastdiff.runtime.ops",
    "fastdiff.executor": "fastdiff.runtime.executor",
    "fastdiff.loop": "fastdiff.runtime.loop",
    "fastdiff.graphs": "fastdiff.runtime.graphs",
    "fastdiff.row_terms": "fastdiff.runtime.row_terms",
    "fastdiff.denoisers": "fastdiff.models.denoisers",
    "fastdiff.zoo": "fastdiff.models.zoo",
    "fastdiff.zoo.digits": "fastdiff.models.zoo.digits",
    "fastdiff.zoo.png": "fastdiff.models.zoo.png",
    "fastdiff.manifest": "fastdiff.distributed.manifest",
    "fastdiff.bench_step": "fastdiff.bench.step",
    "fastdiff.bench_loop": "fastdiff.bench.loop",
    "fastdiff.bench_pipeline": "fastdiff.bench.pipeline",
    "fastdiff.profile": "fastdiff.bench.profile",
    "fastdiff.timing": "fastdiff.bench.timing",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at its new path."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import system stamped the old name's spec on the module: give it back its own
        module.__spec__ = self._specs[module.__spec__.name]


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once): before the path finder, which would
    otherwise load a second copy of a moved package's submodule through the alias's ``__path__``."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
