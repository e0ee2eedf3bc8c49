"""``FASTDIFF_CPU_SIMD`` set to something the CPU backend cannot use is refused by name whenever the
``cpu`` backend is asked for (``backend="cpu"``, ``FASTDIFF_BACKEND=cpu``) or considered by ``auto``
on CPU tensors: a ``ValueError`` naming the variable and the allowed values, before the model is
called, never a silent fall-back to ``reference``. ``import fastdiff`` and the ``reference``
backend still work. Each case runs in a subprocess (the variable is read when the extension loads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# runs every API case in one interpreter and prints one JSON line of outcomes
_API = r"""
import json, sys, warnings
import torch
import fastdiff
from fastdiff.runtime import ops
calls = []
def model(x, t):
    calls.append(1)
    return 0.1 * x
out = {"status": list(ops.backend_status("cpu"))}
for backend in sys.argv[1].split(","):
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fall-back to reference would warn
        try:
            fastdiff.sample(model, torch.randn(2, 3), sampler="ddim", steps=3, backend=backend)
            out[backend] = ["ok", "", len(calls)]
        except Exception as exc:
            out[backend] = [type(exc).__name__, str(exc), len(calls)]
print(json.dumps(out))
"""

# makes `import fastdiff._C` fail as the extension does for a level this CPU lacks
_LACKING = r"""
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastdiff._C":
            raise ImportError("FASTDIFF_CPU_SIMD='avx512' but this CPU does not support it (best: avx2)")
sys.meta_path.insert(0, _Refuse())
"""


def _run(code: str, args: list[str], **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("FASTDIFF_BACKEND", "FASTDIFF_CPU_SIMD")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code, *args], env=e, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def _api(backends: str, prelude: str = "", **env) -> dict:
    r = _run(prelude + _API, [backends], **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_refused(outcome: list, value: str) -> None:
    kind, msg, calls = outcome
    assert kind == "ValueError", outcome
    assert "FASTDIFF_CPU_SIMD" in msg and repr(value) in msg, msg
    assert "scalar, avx2, avx512" in msg, msg
    assert calls == 0, outcome  # refused before the model ran


@pytest.mark.parametrize("value", ["bogus", "AVX2", "sse4"])
def test_invalid_value_is_refused_for_cpu_and_auto(value):
    out = _api("cpu,auto,reference", FASTDIFF_CPU_SIMD=value)
    _check_refused(out["cpu"], value)
    _check_refused(out["auto"], value)
    assert out["reference"][0] == "ok", out["reference"]  # unaffected: it never uses the kernel
    ok, why = out["status"]
    assert not ok and "FASTDIFF_CPU_SIMD" in why and repr(value) in why, why


def test_fastdiff_backend_env_naming_cpu_is_refused_too():
    out = _api("auto", FASTDIFF_CPU_SIMD="bogus", FASTDIFF_BACKEND="cpu")
    _check_refused(out["auto"], "bogus")


def test_a_level_the_cpu_lacks_is_refused():
    """The extension refuses to load for a level this CPU cannot run (simulated: the test CPU may
    have them all); the refusal names the variable, the value, the CPU's best level and the allowed values."""
    out = _api("cpu,auto", prelude=_LACKING, FASTDIFF_CPU_SIMD="avx512")
    for backend in ("cpu", "auto"):
        _check_refused(out[backend], "avx512")
        assert "best: avx2" in out[backend][1]


def test_a_level_this_cpu_really_lacks_is_refused():
    from fastdiff.backends import cpu

    if cpu._C is None:
        pytest.skip("the extension is not built")
    from .._cpu_levels import LEVELS, available_levels

    missing = [lv for lv in LEVELS if lv not in available_levels(cpu._C)]
    if not missing:
        pytest.skip(f"this CPU runs every level ({', '.join(LEVELS)})")
    out = _api("cpu,auto", FASTDIFF_CPU_SIMD=missing[-1])
    _check_refused(out["cpu"], missing[-1])
    _check_refused(out["auto"], missing[-1])


def test_valid_levels_still_run():
    from fastdiff.backends import cpu

    if cpu._C is None:
        pytest.skip("the extension is not built")
    out = _api("cpu,auto", FASTDIFF_CPU_SIMD="scalar")
    assert out["cpu"][0] == "ok" and out["auto"][0] == "ok", out
    assert out["status"][0] and "SIMD scalar" in out["status"][1], out


def test_cli_sample_auto_refuses_with_one_line(tmp_path):
    out_dir = str(tmp_path / "out")
    code = "import sys; from fastdiff.cli import main; sys.exit(main(sys.argv[1:]))"
    r = _run(code, ["sample", "--out", out_dir, "-n", "2", "--steps", "2", "--backend", "auto"],
             FASTDIFF_CPU_SIMD="bogus")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdiff sample: error: "), r.stderr
    assert "FASTDIFF_CPU_SIMD" in lines[0] and "'bogus'" in lines[0] and "scalar, avx2, avx512" in lines[0]
    assert not os.path.exists(out_dir)


def test_import_and_reference_are_unaffected():
    r = _run("import fastdiff, fastdiff.runtime.ops, fastdiff.backends.cpu as c; print(c.available()[0])", [],
             FASTDIFF_CPU_SIMD="bogus")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
