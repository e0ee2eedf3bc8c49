"""The sampling loop's entry point for a plan (:func:`run_plan`, :class:`LoopOptions`). The
host-side terms of a row (classifier guidance, Langevin operands, the callbacks' data estimate)
live in :mod:`fastdiff.runtime.row_terms` and are re-exported here.

The loop itself is :class:`fastdiff.runtime.executor.Executor`: everything it needs per row is prepared
before the first model call (timesteps, guidance scales and clip bounds in device tensors indexed
by row, persistent buffers, the backend), so it performs no host-device synchronisation on CUDA
(non-finite model outputs are recorded by the kernel and reported, with the step, after the loop).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .executor import Call, Executor, NonFiniteError, draw_noise  # noqa: F401  (public here since v1)
from .graphs import GraphCaptureError  # noqa: F401
from .kept import kept
from ..core.guidance import Guidance
from ..core.plan import Plan
from .row_terms import classifier_coefficients, classifier_grad, langevin_step_operands, x0_estimate  # noqa: F401

ModelFn = Callable[..., torch.Tensor]
Cond = torch.Tensor | dict | None


@dataclass
class LoopOptions(Call):
    """Options of :func:`run_plan` (see there): one call's inputs (:class:`fastdiff.runtime.executor.Call`:
    ``cond``, ``uncond``, ``seeds``, ``generator``, ``noise_fn``, ``mask``, ``known``, ``callback``,
    ``progress``, ``timer``, ``classifier``, ``classifier_y``, ``post_step``) and how to prepare the
    loop for it."""

    guidance: Guidance | None = None
    backend: str = "auto"
    check_finite: bool = True
    cuda_graph: bool = False
    classifier_scale: float = 1.0


_executors: OrderedDict = OrderedDict()
_executors_lock = threading.Lock()
KEPT_EXECUTORS = 4
"""Executors :func:`run_plan` keeps between calls with ``keep=True`` (the last ones used)."""


def _executor(plan: Plan, x: torch.Tensor, opts: LoopOptions, keep: bool) -> Executor:
    """The executor of this call: built, or (``keep``) the one a previous call with an equal plan,
    state shape, dtype, device and options built (preparing every row again costs about as much as
    a whole loop of a tiny model: validation and backend resolution per row)."""
    def build() -> Executor:
        return Executor(plan, x.shape, x.dtype, x.device, guidance=opts.guidance, backend=opts.backend,
                        check_finite=opts.check_finite,
                        classifier_scale=opts.classifier_scale if opts.classifier is not None else None,
                        masked=opts.mask is not None)

    if not keep:
        return build()
    key = (plan, tuple(x.shape), x.dtype, x.device, opts.guidance, opts.backend, bool(opts.check_finite),
           opts.classifier_scale if opts.classifier is not None else None, opts.mask is not None)
    try:
        hash(key)
    except TypeError:  # a callable or unhashable option: prepared for this call only
        return build()
    return kept(_executors, _executors_lock, key, build, KEPT_EXECUTORS)


def clear_kept() -> None:
    """Drop the executors :func:`run_plan` keeps."""
    with _executors_lock:
        _executors.clear()


def run_plan(plan: Plan, model: ModelFn, x: torch.Tensor, opts: LoopOptions, *, in_place: bool = True,
             keep: bool = False) -> torch.Tensor:
    """Run every row of ``plan`` from the state ``x`` (already scaled by ``plan.init_scale``) through
    a prepared :class:`fastdiff.runtime.executor.Executor` built for this call.

    Returns the final sample scaled by ``plan.out_scale``. With ``in_place`` (the default) it is
    written into ``x`` (in ``x``'s own memory layout) and ``x`` is returned, unless ``x`` cannot
    hold it (an expanded view); without, ``x`` is left as it is and a new tensor comes back.
    Sampling is not differentiable: the loop runs under ``torch.no_grad()`` and returns a tensor
    that does not require grad (classifier guidance takes its own gradient).
    Noise comes from ``opts.noise_fn(row_index, x)`` if given, else ``opts.generator`` (drawn like
    diffusers), else in-kernel Philox keyed by ``opts.seeds``. ``keep``: reuse the executor a previous
    call with an equal plan, state and options prepared (:data:`KEPT_EXECUTORS` are kept; an executor
    gives every concurrent call its own buffers).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"the state must be a floating [B, ...] tensor with B >= 1, got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
    with torch.no_grad():
        user_x = x.detach() if x.requires_grad else x  # same storage: still updated in place
        ex = _executor(plan, x, opts, keep)
        out = ex.run_graphed(model, user_x, opts) if opts.cuda_graph else ex.run(model, user_x, opts)
        if opts.timer is not None:
            opts.timer.end()
        if not in_place:
            return out
        if _writable_in_place(user_x):
            user_x.copy_(out)
            return user_x
        return out  # x overlaps itself (an expanded view): it cannot hold the result


def _writable_in_place(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` has its own memory location (no expanded or overlapping dims)."""
    extent = 0  # dims sorted by stride: each must step past everything the smaller ones reach
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= extent:
            return False
        extent += (size - 1) * stride
    return True
