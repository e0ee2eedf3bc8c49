"""First-order DPM-Solver++ (diffusers' ``DPMSolverMultistepScheduler`` with ``solver_order=1``).

The same exponential-integrator update as :mod:`fastdiff.samplers.dpmpp` with the order fixed at
one (no history): the data-prediction form of DDIM on the DPM-Solver grid, and its SDE variant.
"""

from __future__ import annotations

from ..core.plan import Plan
from . import register
from .dpmpp import _OPTIONS, _SDE_OPTIONS, PREDICTIONS, _dpmpp


@register("dpmpp_1", options=_OPTIONS, predictions=PREDICTIONS)
def dpmpp_1(schedule, steps: int, prediction: str, **options) -> Plan:
    """DPM-Solver++(1), first-order data-prediction ODE solver (Lu et al. 2022)."""
    return _dpmpp("dpmpp_1", schedule, steps, prediction, 1, False, **options)


@register("dpmpp_1_sde", options=_SDE_OPTIONS, predictions=PREDICTIONS)
def dpmpp_1_sde(schedule, steps: int, prediction: str, **options) -> Plan:
    """SDE-DPM-Solver++(1), first-order solver of the diffusion SDE (Lu et al. 2022)."""
    return _dpmpp("dpmpp_1_sde", schedule, steps, prediction, 1, True, **options)
