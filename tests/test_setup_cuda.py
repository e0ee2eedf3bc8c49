"""setup.py's CUDA extension: which nvcc and CUDA runtime it picks, and that an nvcc or link failure
skips ``fastdiff._C_cuda`` with a warning while the build goes on (no GPU, no CUDA torch needed).

setup.py is run in a subprocess with ``setuptools.setup`` replaced (nothing is installed or built
but what a test asks for); nvcc is a fake script named by ``FASTDIFF_NVCC``, and the extension
that must still be built after the failure is a one-line C module (fastdiff._C itself takes minutes
to compile; it is built by the same ``build_ext`` loop, after or before ``_C_cuda``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = textwrap.dedent("""
    import json, os, sys, types, setuptools
    setuptools.setup = lambda **kw: None  # setup.py's own setup() call: a no-op here
    # a CPU-only torch stand-in (setup.py reads torch.version.cuda and torch's folder; importing the
    # real one costs seconds per run): the tests pass the CUDA version they mean
    torch = sys.modules["torch"] = types.ModuleType("torch")
    torch.version, torch.__file__ = types.SimpleNamespace(cuda=None), "/nonexistent/torch/__init__.py"
    sys.argv = ["setup.py"]
    import runpy
    g = runpy.run_path("setup.py")
    out = {}
    exec(sys.stdin.read())
    print("RESULT " + json.dumps(out))
""")


def _run(code: str, env: dict | None = None) -> tuple[dict, str]:
    full = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=textwrap.dedent(code), cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stdout + proc.stderr


def _fake_nvcc(path, release: str, compile_rc: int = 0) -> str:
    """An nvcc that says it is CUDA ``release`` and exits ``compile_rc`` when asked to compile
    (writing an empty object when that is 0)."""
    path.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for a in "$@"; do
          if [ "$a" = "--version" ]; then echo "Cuda compilation tools, release {release}, V{release}.1"; exit 0; fi
        done
        echo "fake nvcc: error: cannot compile" >&2
        if [ {compile_rc} -ne 0 ]; then exit {compile_rc}; fi
        while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then : > "$2"; fi; shift; done
        """))
    path.chmod(0o755)
    return str(path)


BUILD = """
from setuptools import Distribution, Extension
import os, warnings
ext, cls, note = g["cuda_extension"]({torch_cuda!r}, probe_torch=False)
out["note"] = note
src = os.path.join({tmp!r}, "tiny.c")
open(src, "w").write("int fd_tiny(void) {{ return 1; }}\\n")
tiny = Extension("fastdiff._tiny", [src])
build = g["with_cpu_levels"](cls)
if {link_error}:  # g++ compiles nothing here; the link of _C_cuda fails as a broken toolchain's would
    from setuptools.errors import LinkError
    class build(build):
        def build_extension(self, e):
            if e.name != "fastdiff._C_cuda":
                return super().build_extension(e)
            self.compiler.compile = lambda sources, **kw: [os.path.join({tmp!r}, "b.o")]
            def fail(*a, **kw): raise LinkError("ld: cannot find -lcudart")
            self.compiler.link_shared_object = fail
            try:
                return super().build_extension(e)
            finally:  # the class's own methods again, for the next extension
                del self.compiler.compile, self.compiler.link_shared_object
dist = Distribution({{"name": "fastdiff", "ext_modules": [ext, tiny]}})
cmd = build(dist)
cmd.build_lib, cmd.build_temp = os.path.join({tmp!r}, "lib"), os.path.join({tmp!r}, "tmp")
cmd.ensure_finalized()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cmd.run()
lib = os.path.join({tmp!r}, "lib", "fastdiff")
out["built"] = sorted(f.split(".")[0] for f in os.listdir(lib) if f.endswith(".so"))
out["note_file"] = open(os.path.join(lib, "_C_cuda.txt")).read()
out["warnings"] = [str(w.message) for w in caught]
"""


@pytest.mark.parametrize("link_error", [False, True], ids=["nvcc_fails", "link_fails"])
def test_a_failing_cuda_build_is_skipped_with_a_warning_and_the_build_goes_on(tmp_path, link_error):
    nvcc = _fake_nvcc(tmp_path / "nvcc", "13.0", compile_rc=0 if link_error else 1)
    (tmp_path / "b.o").write_bytes(b"")
    out, log = _run(BUILD.format(torch_cuda="13.0", tmp=str(tmp_path), link_error=link_error),
                    env={"FASTDIFF_NVCC": nvcc})
    assert out["built"] == ["_tiny"]  # the extension after the failed one was still built
    what = "LinkError: ld: cannot find -lcudart" if link_error else "CalledProcessError"
    assert out["note_file"].startswith("not built: ") and what in out["note_file"]  # what `fastdiff info` quotes
    assert any("fastdiff._C_cuda not built" in w and what in w for w in out["warnings"]), out["warnings"]
    assert "WARNING: fastdiff._C_cuda not built" in log
    assert nvcc in out["note"]


def test_nvcc_of_torchs_major_version_is_preferred_and_a_mismatch_is_said(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    n12, n13 = _fake_nvcc(tmp_path / "a" / "nvcc", "12.4"), _fake_nvcc(tmp_path / "b" / "nvcc", "13.0")
    code = f"""
    g["_nvcc_candidates"].__globals__["_nvcc_candidates"] = lambda: [{n13!r}, {n12!r}]
    out["12"] = g["pick_nvcc"]("12.8")
    out["13"] = g["pick_nvcc"]("13.0")
    out["11"] = g["pick_nvcc"]("11.8")
    """
    out, _ = _run(code, env={"FASTDIFF_NVCC": ""})
    assert out["12"][:2] == [n12, [12, 4]] and "the major version of torch's CUDA 12.8" in out["12"][2]
    assert out["13"][:2] == [n13, [13, 0]]
    assert out["11"][0] == n13 and "no toolkit for torch's CUDA 11.8" in out["11"][2]
    assert "links its static runtime" in out["11"][2]


def test_fastdiff_nvcc_is_used_alone(tmp_path):
    nvcc = _fake_nvcc(tmp_path / "nvcc", "12.6")
    out, _ = _run('out["pick"] = g["pick_nvcc"]("13.0"); out["missing"] = g["_nvcc_candidates"]()',
                  env={"FASTDIFF_NVCC": nvcc})
    assert out["pick"][0] == nvcc and "no toolkit for torch's CUDA 13.0" in out["pick"][2]
    out, _ = _run('out["missing"] = g["_nvcc_candidates"]()', env={"FASTDIFF_NVCC": str(tmp_path / "absent")})
    assert out["missing"] == []  # a missing FASTDIFF_NVCC is not replaced by another toolkit


def test_torchs_cuda_runtime_is_found_in_the_nvidia_wheel_or_torch_lib(tmp_path):
    wheel = tmp_path / "site" / "nvidia" / "cuda_runtime" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libcudart.so.12").write_bytes(b"")
    cu13 = tmp_path / "site13" / "nvidia" / "cu13" / "lib"
    cu13.mkdir(parents=True)
    (cu13 / "libcudart.so.13").write_bytes(b"")
    bundled = tmp_path / "old" / "torch" / "lib"
    bundled.mkdir(parents=True)
    (bundled / "libcudart-9335f6a2.so.11.0").write_bytes(b"")
    roots = [str(tmp_path / d) for d in ("site", "site13", "old")]
    code = f"""
    f = g["torch_cudart"]
    out["12"], out["13"], out["11"] = f("12.8", {roots!r}), f("13.0", {roots!r}), f("11.8", {roots!r})
    out["none"], out["cpu"] = f("10.2", {roots!r}), f(None, {roots!r})
    """
    out, _ = _run(code)
    assert out["12"] == str(wheel / "libcudart.so.12") and out["13"] == str(cu13 / "libcudart.so.13")
    assert out["11"] == str(bundled / "libcudart-9335f6a2.so.11.0")  # CUDA 11's SONAME has the minor version too
    assert out["none"] is None and out["cpu"] is None


def test_the_extension_links_torchs_runtime_where_the_majors_agree(tmp_path):
    nvcc = _fake_nvcc(tmp_path / "nvcc", "12.8")
    lib = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.12").write_bytes(b"")
    code = f"""
    g["torch_cudart"].__globals__["sys"].path.insert(0, {str(tmp_path)!r})
    ext, cls, note = g["cuda_extension"]("12.8", probe_torch=False)
    out["args"], out["libs"], out["note"] = ext.extra_link_args, ext.libraries, note
    out["macros"] = ext.define_macros
    """
    out, _ = _run(code, env={"FASTDIFF_NVCC": nvcc})
    so = str(lib / "libcudart.so.12")
    assert out["args"] == [so, f"-Wl,-rpath,{lib}"] and "cudart_static" not in out["libs"]
    assert f"linked with torch's CUDA runtime {so}" in out["note"]
    assert ["FD_CUDA_ARCHS", '"80;90"'] in out["macros"]
