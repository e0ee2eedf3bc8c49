"""The ``cuda`` backend's availability decision, with a stand-in for ``fastdiff._C_cuda`` (no GPU needed).

The extension reports the CUDA it was built with (CUDART_VERSION), the driver's CUDA version, the
device count and cudaGetDeviceCount's error (``runtime_info()``, csrc/cuda_info.cu); the backend
is unavailable, with the reason in words, where the driver is older than the toolkit (across a
major version, or within one where no cubin fits the GPU), the runtime fails to initialise or no
device is seen, so that ``auto`` falls back and ``fastdiff info`` says why.
"""

from __future__ import annotations

import types

import pytest
import torch

from fastdiff.backends import cuda as cb
from fastdiff.cli import main
from fastdiff.core.args import COEF_OFFSETS, PTR_NAMES
from fastdiff.runtime import ops

GOOD = dict(built=13000, runtime=13000, driver=13000, devices=1, error=0, error_name="", error_string="")


def _fake_module(archs: str = "80;90", **info) -> types.SimpleNamespace:
    calls = []

    def runtime_info():
        calls.append(1)
        return {**GOOD, **info}

    return types.SimpleNamespace(__name__="fastdiff._C_cuda", runtime_info=runtime_info, CUDA_ARCHS=archs,
                                 COEF_OFFSETS=dict(COEF_OFFSETS), PTR_NAMES=list(PTR_NAMES), calls=calls)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Install a fake extension and a torch that sees one GPU of compute capability 9.0."""

    def install(**kw):
        mod = _fake_module(**kw)
        monkeypatch.setattr(cb, "_C_cuda", mod)
        monkeypatch.setattr(cb, "_runtime", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H100")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        return mod

    return install


def test_versions_in_words():
    assert cb.cuda_version(12020) == "12.2" and cb.cuda_version(13000) == "13.0" and cb.cuda_version(11080) == "11.8"


def test_a_driver_for_an_older_major_version_is_refused_with_both_versions():
    why = cb.runtime_problem({**GOOD, "driver": 12020}, "80;90", (9, 0))
    assert why.startswith("the driver supports CUDA 12.2 but fastdiff._C_cuda was built with CUDA 13.0"), why
    assert "update the driver" in why and "FASTDIFF_NVCC" in why


def test_an_older_minor_version_runs_only_where_a_cubin_fits_the_gpu():
    info = {**GOOD, "built": 12080, "runtime": 12080, "driver": 12040}
    assert cb.runtime_problem(info, "80;90", (9, 0)) is None  # minor-version compatibility: the sm_90 cubin
    assert cb.runtime_problem(info, "80;90", (8, 9)) is None  # sm_80 code runs on 8.9
    why = cb.runtime_problem(info, "80;90", (10, 0))  # only the PTX would do: JIT needs a 12.8 driver
    assert "driver supports CUDA 12.4 but fastdiff._C_cuda was built with CUDA 12.8" in why
    assert "no cubin for sm_100" in why
    assert cb.runtime_problem(info, "90a", (9, 0)) is None and cb.runtime_problem(info, "90a", (9, 1)) is not None
    assert cb.runtime_problem(info, "80;90", None) is not None  # the GPU unknown: not assumed to fit
    assert cb.runtime_problem({**info, "driver": 12080}, "", None) is None  # the same version: nothing to decide


def test_initialisation_errors_and_no_device_are_reported_in_words():
    why = cb.runtime_problem({**GOOD, "devices": 0, "error": 100, "error_name": "cudaErrorNoDevice",
                              "error_string": "no CUDA-capable device is detected"})
    assert why == ("the CUDA runtime failed to initialise: cudaErrorNoDevice (100): no CUDA-capable device is "
                   "detected")
    assert cb.runtime_problem({**GOOD, "devices": 0}) == "the CUDA runtime sees no device"
    why = cb.runtime_problem({**GOOD, "driver": 0, "error": 35, "error_name": "cudaErrorInsufficientDriver",
                              "error_string": "CUDA driver version is insufficient for CUDA runtime version"})
    assert why.startswith("no CUDA driver is installed") and "cudaErrorInsufficientDriver (35)" in why


def test_available_asks_the_extension_once_and_names_the_versions(fake_cuda):
    mod = fake_cuda()
    ok, details = cb.available()
    assert ok and "Fake H100" in details and "built with CUDA 13.0, runtime 13.0, driver 13.0" in details
    assert cb.available()[0] and len(mod.calls) == 1  # cached: resolving a backend does not call into CUDA again


def test_an_old_driver_makes_the_backend_unavailable_so_auto_falls_back(fake_cuda, monkeypatch):
    fake_cuda(driver=12020)
    ok, why = cb.available()
    assert not ok and "the driver supports CUDA 12.2 but fastdiff._C_cuda was built with CUDA 13.0" in why
    assert ops.backend_status("cuda") == (False, why)  # what `auto` consults (ops._fused_for) and info prints
    with pytest.raises(RuntimeError, match="the driver supports CUDA 12.2"):
        ops.resolve("cuda", types.SimpleNamespace(x=torch.empty(1)))
    # auto on CUDA tensors (only the device is read before the backend is chosen): cuda is passed over
    on_gpu = types.SimpleNamespace(x=types.SimpleNamespace(device=torch.device("cuda", 0)))
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setitem(ops._AUTO_ORDER, "cuda", ("cuda",))  # (triton aside: whether it runs here is not the point)
    with pytest.warns(RuntimeWarning, match="cuda: the driver supports CUDA 12.2"):
        assert ops.resolve("auto", on_gpu).NAME == "reference"


def test_an_extension_without_runtime_info_is_unavailable(fake_cuda, monkeypatch):
    mod = fake_cuda()
    del mod.runtime_info  # built before runtime_info existed
    ok, why = cb.available()
    assert not ok and "cannot report its CUDA runtime" in why and "rebuild" in why


def test_fastdiff_info_prints_the_reason(fake_cuda, capsys):
    fake_cuda(driver=12020)
    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("cuda "))
    assert "unavailable" in line and "driver supports CUDA 12.2 but fastdiff._C_cuda was built with CUDA 13.0" in line


def test_a_missing_extension_quotes_the_build_note(monkeypatch, tmp_path):
    note = tmp_path / "_C_cuda.txt"
    note.write_text("not built: CalledProcessError: Command '['nvcc', ...]' returned non-zero exit status 1\n")
    monkeypatch.setattr(cb, "_C_cuda", None)
    monkeypatch.setattr(cb, "_import_error", ImportError("cannot import name '_C_cuda'"))
    monkeypatch.setattr(cb, "BUILD_NOTE", str(note))
    ok, why = cb.available()
    assert not ok and "setup.py: not built: CalledProcessError" in why
    monkeypatch.setattr(cb, "BUILD_NOTE", str(tmp_path / "absent.txt"))
    assert "built by `pip install -e .`" in cb.available()[1]
