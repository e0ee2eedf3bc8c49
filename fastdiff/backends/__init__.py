"""Step backends: each executes one plan row (see :mod:`fastdiff.plan`) with the same contract.

A backend module exposes ``NAME``, ``available() -> (bool, reason)``, ``supports(args) -> bool`` and
``step(args: StepArgs) -> None``. :mod:`fastdiff.ops` validates arguments and dispatches.
"""
