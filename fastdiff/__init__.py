"""fastdiff: one fused kernel per sampler step for any PyTorch diffusion or flow model.

Public entry points: :func:`sample`, :class:`Sampler` (prepared once, called many times),
:func:`make_plan`, the modules :mod:`fastdiff.samplers`,
:mod:`fastdiff.core.schedules`, :mod:`fastdiff.core.guidance`, :mod:`fastdiff.models.denoisers`,
:mod:`fastdiff.models`, :mod:`fastdiff.core.rng` and :mod:`fastdiff.runtime.ops`.
"""

from . import _moved
from . import guiders
from .api import Sampler, clear_cache, make_plan, sample
from .runtime.executor import NonFiniteError, StopSampling

_moved.install()

__version__ = "0.1.0"
__all__ = ["sample", "Sampler", "make_plan", "clear_cache", "NonFiniteError", "StopSampling", "guiders", "__version__"]
