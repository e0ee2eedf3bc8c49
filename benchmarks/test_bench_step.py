"""Fused step per sampler x backend x shape x dtype: one real plan row through ``fastdiff.runtime.ops.step``.

The row is the middle row of ``fastdiff.make_plan(sampler, 10, ...)`` with classifier-free
guidance (:func:`fastdiff.bench.step.plan_row_args`); the step runs as the loop runs it, validated
once and then dispatched with ``check=False``. Benchmarks are grouped per sampler, shape and dtype,
so pytest-benchmark's table and ``compare`` put the backends of one case side by side.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.runtime import ops
from fastdiff import samplers
from fastdiff.bench.step import dtype_name, plan_row_args, step_bytes

from .conftest import STEP_DTYPES, STEP_SHAPES, device_backends, need_backend


def _sync(device: str):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@pytest.mark.parametrize("dtype", STEP_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,backend", device_backends(), ids=lambda v: v)
@pytest.mark.parametrize("sampler", samplers.available())
def test_step(bench, sampler, device, backend, shape, dtype):
    need_backend(backend)
    args = plan_row_args(sampler, shape, dtype, device)
    ops.step(args, backend=backend)  # validates, and raises if the backend cannot run this row
    sync = _sync(device)
    fused_out = args.out.clone()
    ops.step(args, backend="reference")
    # a benchmark of a wrong answer is worthless: the backend agrees with reference on this row
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    err = float((fused_out.double() - args.out.double()).norm() / args.out.double().norm().clamp_min(1e-30))
    assert err <= tol, f"{backend} differs from reference on {sampler}'s row: {err:.2e}"

    def step():
        ops.step(args, backend=backend, check=False)
        sync()

    bench(step, group=f"step {sampler} {'x'.join(map(str, shape))} {dtype_name(dtype)} {device}",
          sampler=sampler, backend=backend, device=device, shape=list(shape), dtype=dtype_name(dtype),
          row=args.row, min_bytes=step_bytes(args))
