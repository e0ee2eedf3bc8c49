"""Step backends: each executes one plan row (see :mod:`fastdiff.core.plan`) with the same contract.

A backend module exposes ``NAME``, ``available() -> (bool, reason)``, ``supports(args) -> bool`` and
``step(args: StepArgs) -> None``. :mod:`fastdiff.runtime.ops` validates arguments and dispatches.
"""
