"""fastdiff.runtime.ops as the one dispatch point: which backend a row goes to (by name, by
``FASTDIFF_BACKEND``, by ``auto`` with its one warning), and that ``step`` through it computes what
the reference backend computes. Argument refusals are in test_op_errors.py."""

import warnings

import pytest
import torch

from fastdiff.backends import cpu, reference
from fastdiff.runtime import ops

from .._fixtures import _one_thread, seed  # noqa: F401  (fixtures, found by name)
from ..backends._cases import FEATURES, build


def test_every_backend_reports_its_status():
    status = ops.available_backends()
    assert set(status) == set(ops.BACKENDS)
    for name, (ok, why) in status.items():
        assert isinstance(ok, bool) and isinstance(why, str)
    assert status["reference"][0]  # plain torch: always there
    with pytest.raises(ValueError, match="'tpu'"):
        ops.backend_status("tpu")


def test_requested_backend_reads_the_environment_only_for_auto(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    assert ops.requested_backend("auto") == "reference"
    assert ops.requested_backend(None) == "reference"
    assert ops.requested_backend("cpu") == "cpu"
    monkeypatch.setenv("FASTDIFF_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        ops.requested_backend("auto")
    monkeypatch.delenv("FASTDIFF_BACKEND")
    assert ops.requested_backend("auto") == "auto"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_auto_picks_the_cpu_kernel_for_cpu_tensors(dtype):
    if not cpu.available()[0]:
        pytest.skip("the C++ extension is not built")
    assert ops.backend_for("auto", torch.zeros(2, 3, dtype=dtype)) == "cpu"
    assert ops.backend_for("reference", torch.zeros(2, 3, dtype=dtype)) == "reference"


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: (False, "not built (test)"))
    monkeypatch.setattr(ops, "_warned", set())
    pool, make_args, _ = build(FEATURES["plain"], (2, 3, 4), torch.float32, 0, "cpu")
    with pytest.warns(RuntimeWarning, match="using the reference backend.*not built"):
        assert ops.resolve("auto", make_args(pool)) is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        assert ops.resolve("auto", make_args(pool)) is reference
    with pytest.raises(RuntimeError, match="'cpu' was requested but is not available"):
        ops.resolve("cpu", make_args(pool))


def test_a_named_backend_that_cannot_run_the_row_says_so():
    pool, make_args, _ = build(FEATURES["plain"], (2, 3, 4), torch.float32, 0, "cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ops.resolve("cuda", make_args(pool))


@pytest.mark.parametrize("feature", ["plain", "cfg_rescale", "dynamic_clip", "reads3_writes2",
                                     "mask_philox_known_noise"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_step_through_the_dispatch_point_equals_reference(seed, feature, backend):
    pool, make_args, outputs = build(FEATURES[feature], (3, 2, 5, 7), torch.float32, seed, "cpu")
    ref = {k: v.clone() for k, v in pool.items()}
    got = {k: v.clone() for k, v in pool.items()}
    reference.step(make_args(ref))
    ops.step(make_args(got), backend=backend)
    for k in outputs:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, equal_nan=True, msg=k)
