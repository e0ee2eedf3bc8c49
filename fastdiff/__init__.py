"""fastdiff: one fused kernel per sampler step for any PyTorch diffusion or flow model.

Public entry points: :func:`sample`, :func:`make_plan`, the modules :mod:`fastdiff.samplers`,
:mod:`fastdiff.schedules`, :mod:`fastdiff.guidance`, :mod:`fastdiff.denoisers`,
:mod:`fastdiff.models`, :mod:`fastdiff.rng` and :mod:`fastdiff.ops`.
"""

from .api import make_plan, sample
from .loop import NonFiniteError

__version__ = "0.1.0"
__all__ = ["sample", "make_plan", "NonFiniteError", "__version__"]
