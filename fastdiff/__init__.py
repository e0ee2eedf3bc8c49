"""fastdiff: one fused kernel per sampler step for any PyTorch diffusion or flow model.

Public entry points: :func:`sample`, :class:`Sampler` (prepared once, called many times),
:func:`make_plan`, the modules :mod:`fastdiff.samplers`,
:mod:`fastdiff.schedules`, :mod:`fastdiff.guidance`, :mod:`fastdiff.denoisers`,
:mod:`fastdiff.models`, :mod:`fastdiff.rng` and :mod:`fastdiff.ops`.
"""

from .api import Sampler, clear_cache, make_plan, sample
from .executor import NonFiniteError, StopSampling

__version__ = "0.1.0"
__all__ = ["sample", "Sampler", "make_plan", "clear_cache", "NonFiniteError", "StopSampling", "__version__"]
