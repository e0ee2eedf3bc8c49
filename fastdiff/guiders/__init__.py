"""Guidance methods blended inside the fused step.

Every guider in ``diffusers.guiders`` is a per-sample linear blend of model branches whose weights
come from a few dot products per sample; :mod:`~fastdiff.guiders.methods` states each one that way,
:mod:`~fastdiff.guiders.stats` computes the dot products in one pass, and
:mod:`~fastdiff.guiders.apply` turns a step's blend into the fused step's operands.
:func:`~fastdiff.guiders.convert.from_diffusers` reads a diffusers guider's configuration.
"""

from .apply import coefficients, guide
from .convert import from_diffusers, perturbed_model
from .frequency import FrequencyDecoupled
from .methods import (APG, GUIDERS, LTX2, APGMix, AutoGuidance, CFGZeroStar, Guider, MagnitudeAware, Perturbed,
                      StepBlend, TangentialCFG)
from .stats import Stats, gram

GUIDERS["frequency_decoupled"] = FrequencyDecoupled

__all__ = ["APG", "APGMix", "AutoGuidance", "CFGZeroStar", "FrequencyDecoupled", "GUIDERS", "Guider", "LTX2", "MagnitudeAware", "Perturbed",
           "Stats", "StepBlend", "TangentialCFG", "coefficients", "from_diffusers", "gram", "guide", "perturbed_model"]
