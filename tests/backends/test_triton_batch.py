"""The ``triton`` backend runs batches above the kernel's grid limit (``MAX_BATCH`` samples on grid
axis 1) as slices along the batch, equal to ``reference`` (it used to report them unsupported, so
``backend="triton"`` raised and ``auto`` fell back)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import fastdiff  # noqa: E402
from fastdiff.runtime import ops  # noqa: E402
from fastdiff.backends import triton as tb  # noqa: E402

from ._cases import build, triton_kernels  # noqa: E402

K, DEVICE = triton_kernels()


@pytest.fixture
def small_cap(monkeypatch):
    monkeypatch.setattr(K, "MAX_BATCH", 2)


@pytest.mark.parametrize("feat", [
    {"cfg": True, "rescale": True, "clip": 2, "noise": "philox", "reads": 2, "writes": ("h1", "new")},
    {"mask": "philox", "noise": "philox", "in_place": True, "writes": ("x",)},
    # the next model input: every copy's rows lo..hi for a slice lo..hi (copies B rows apart)
    {"cfg": True, "noise": "philox", "u": 2, "flag": True, "writes": ("new",)},
    {"u": 1, "u_scale": 1.0, "in_place": True, "flag": True},
    {"cfg": True, "rescale": True, "clip": 2, "reads": 4, "writes": ("h1", "new"), "mask": "philox", "noise": "philox",
     "e": "all", "g": "random", "u": 2, "flag": True, "in_place": True},
])
def test_batch_above_the_grid_limit_runs_in_slices(small_cap, feat):
    pool, make_args, outputs = build(feat, (5, 3, 7), torch.float32, 1234, DEVICE)
    ref = {k: v.clone() for k, v in pool.items()}
    got = {k: v.clone() for k, v in pool.items()}
    a = make_args(got)
    assert a.x.shape[0] > K.MAX_BATCH and tb.supports(a)
    ops.step(make_args(ref), backend="reference")
    ops.step(a, backend="triton")
    for k in outputs:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6)
    if "u" in outputs:
        assert torch.isfinite(got["u"]).all(), "a row of u was left unwritten"


@pytest.mark.parametrize("sample", [0, 2, 4])
def test_flag_from_any_slice(small_cap, sample):
    # the non-finite model output sits in the first, a middle or the last slice (of 1 sample)
    pool, make_args, outputs = build({"cfg": True, "u": 2, "flag": True}, (5, 3, 7), torch.float32, 99, DEVICE)
    pool["m_c"][sample, 1, 4] = float("nan")
    a = make_args(pool)
    ops.step(a, backend="triton")
    assert a.flag.tolist() == [1]
    u = a.u.view(2, 5, 3, 7)
    bad = ~torch.isfinite(u)
    assert bad[:, sample].any() and not torch.cat([bad[:, :sample], bad[:, sample + 1:]], 1).any()


def test_sample_with_a_batch_above_the_grid_limit(small_cap):
    noise = torch.randn(5, 2, 3, device=DEVICE)
    kw = dict(sampler="dpmpp_2m_sde", steps=3, seed=list(range(5)))
    ref = fastdiff.sample(lambda x, t: torch.tanh(x * 0.3), noise, backend="reference", **kw)
    out = fastdiff.sample(lambda x, t: torch.tanh(x * 0.3), noise, backend="triton", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
