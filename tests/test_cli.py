"""The command line over arguments nobody foresaw: every bad one ends in one line naming the flag and
exit status 2 (argparse style, checked before any work or any file written), never a traceback;
every good one runs. Tiny shapes and 1-2 steps, in-process."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from fastdiff.cli import main


def _model(x, t):
    return torch.tanh(x) * 0.5


def make_model():
    return _model


def _bad_shape(x, t):
    return x[:, :1]


def _nan_model(x, t):
    return x * float("nan")


def _fails(capsys, argv: list[str], *needles: str, rc: int = 2) -> str:
    """``main(argv)`` returns ``rc`` with one ``fastdiff CMD: error:`` line on stderr holding every needle."""
    assert main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fastdiff {argv[0]}: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


PROFILE = ["profile", "--shape", "1,3", "--steps", "1", "--warmup", "0"]


@pytest.mark.parametrize("extra, needles", [
    (["--shape", "abc"], ["--shape", "'abc'"]),
    (["--shape", "1,,3"], ["--shape"]),
    (["--shape", "0,3"], ["--shape"]),
    (["--shape", "5"], ["--shape", "at least 2"]),
    (["--steps", "0"], ["--steps must be >= 1"]),
    (["--warmup", "-1"], ["--warmup"]),
    (["--sampler", "bogus"], ["--sampler", "'bogus'"]),
    (["--device", "xyz"], ["--device 'xyz'"]),
    (["--device", "meta"], ["--device 'meta'"]),
    (["--backend", "bogus"], ["--backend bogus must be one of"]),
    (["--guidance-scale", "nan"], ["--guidance-scale must be finite"]),
    (["--variants", "bogus"], ["--variants", "'bogus'"]),
    (["--variants", ""], ["--variants"]),
    (["--model", "os"], ["--model must be 'module:attr'"]),
    (["--model", ":x"], ["--model must be 'module:attr'"]),
    (["--model", "no_such_module_fd:f"], ["--model", "cannot import 'no_such_module_fd'"]),
    (["--model", "os:no_such_attr"], ["--model", "no attribute 'no_such_attr'"]),
    (["--model", "os:sep"], ["--model", "not a callable"]),
    (["--model", "torch:tanh"], ["--model torch:tanh", "model(x, t) failed", "TypeError"]),
    (["--model", f"{__name__}:_bad_shape"], ["--model", "must return a tensor of x's shape (1, 3)"]),
    (["--model", f"{__name__}:_model", "--guidance-scale", "7.5"], ["--guidance-scale 7.5 needs the built-in model"]),
])
def test_profile_bad_arguments(capsys, extra, needles):
    _fails(capsys, PROFILE + extra, *needles)


def test_profile_bad_output_paths(tmp_path, capsys):
    _fails(capsys, PROFILE + ["--json", str(tmp_path)], "--json", "is a directory")
    _fails(capsys, PROFILE + ["--trace", str(tmp_path)], "--trace", "is a directory")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _fails(capsys, PROFILE + ["--trace", str(blocker / "t.json")], "--trace", "cannot create its folder")


def test_profile_backend_not_available_here(capsys, monkeypatch):
    from fastdiff.runtime import ops

    if ops.backend_status("triton")[0]:
        pytest.skip("triton runs here")
    _fails(capsys, PROFILE + ["--backend", "triton"], "--backend triton", "not available")
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    _fails(capsys, PROFILE, "FASTDIFF_BACKEND=bogus", "must be one of")


def test_profile_nan_model_is_one_line(capsys):
    _fails(capsys, PROFILE + ["--model", f"{__name__}:_nan_model", "--variants", "reference"],
           "--model", "NaN or Inf")


def test_profile_user_model_defaults_to_no_guidance(tmp_path, capsys):
    # --guidance-scale defaults to 7.5 only for the built-in model: a --model run must not need "--guidance-scale 1"
    for spec in (f"{__name__}:_model", f"{__name__}:make_model"):
        out = tmp_path / "p.json"
        assert main(PROFILE + ["--model", spec, "--variants", "reference", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["guidance_scale"] is None
    capsys.readouterr()


SAMPLE = ["sample", "-n", "1", "--steps", "1"]


@pytest.mark.parametrize("extra, needles", [
    (["--steps", "0"], ["--steps must be in [1, 1000000]"]),
    (["--steps", "1000000000000"], ["--steps must be in [1, 1000000]"]),
    (["--seed", "18446744073709551616"], ["--seed", "64-bit word"]),
    (["--seed", "18446744073709551615", "-n", "2"], ["--seed", "--num 2"]),
    (["--seed", "-9223372036854775809"], ["--seed"]),
    (["--guidance-scale", "1e308"], ["--guidance-scale", "float32"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["--timeout", "nan"], ["--timeout"]),
    (["--sampler", "bogus"], ["--sampler", "'bogus'"]),
    (["--backend", "bogus"], ["--backend bogus"]),
    (["--device", "xyz"], ["--device 'xyz'"]),
    (["--prediction", "bogus"], ["--prediction must be one of"]),
    (["--sampler", "ddim", "--prediction", "flow"], ["--sampler 'ddim' does not support prediction 'flow'"]),
    (["--schedule", "{bad"], ["--schedule", "not valid JSON"]),
    (["--schedule", "[1, 2]"], ["--schedule must be a JSON object"]),
    (["--schedule", "/no/such/schedule.json"], ["--schedule /no/such/schedule.json: cannot read it"]),
    (["--schedule", '{"beta_schedule": "bogus"}'], ["--schedule:", "beta_schedule"]),
    (["--model", "no_such_module_fd:f"], ["--model", "cannot import"]),
    (["--model", "torch:tanh"], ["--model torch:tanh", "model(x, t) failed"]),
    (["--model", f"{__name__}:_bad_shape", "--shape", "3"], ["--model", "shape (1, 3)"]),
    (["-n", "0"], ["--num must be >= 1"]),
    (["--shape", "0"], ["--shape must be", "ints >= 1"]),
    (["--shape", "a,b"], ["--shape must be"]),
    (["--model", "digits", "--class", "10"], ["--class must be in 0..9"]),
    (["--model", "digits", "--guidance-scale", "3"], ["--guidance-scale needs --class"]),
    (["--model", "digits", "--shape", "3"], ["--model digits samples shape 1,8,8"]),
    (["--model", "digits", "--prediction", "v"], ["--model digits predicts eps"]),
    (["--class", "3"], ["--class and --guidance-scale need a class-conditional"]),
    (["--model", ":f"], ["--model must be one of"]),
    (["--guidance-scale", "nan"], ["--guidance-scale must be finite"]),
    (["--timeout", "-1"], ["--timeout"]),
    (["--schedule", '{"num_train_timesteps": 0}'], ["--schedule"]),
])
def test_sample_bad_arguments_touch_nothing(tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    _fails(capsys, SAMPLE + ["--out", str(out)] + extra, *needles)
    assert not out.exists()  # refused before --out (and its manifest) was written


def test_sample_bad_out_and_grid(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    _fails(capsys, SAMPLE + ["--out", str(f)], "--out", "is a file")
    _fails(capsys, SAMPLE + ["--out", str(f / "sub")], "--out")
    _fails(capsys, SAMPLE + ["--out", str(tmp_path / "o"), "--shape", "4,4", "--grid", str(tmp_path)],
           "--grid", "is a directory")
    assert not (tmp_path / "o").exists()


def test_sample_nan_model_is_one_line(tmp_path, capsys):
    _fails(capsys, SAMPLE + ["--out", str(tmp_path / "o"), "--model", f"{__name__}:_nan_model"],
           "--model", "NaN or Inf", rc=1)


def test_sample_backend_not_available_here(tmp_path, capsys):
    from fastdiff.runtime import ops

    if ops.backend_status("cuda")[0]:
        pytest.skip("the cuda backend runs here")
    _fails(capsys, SAMPLE + ["--out", str(tmp_path / "o"), "--backend", "cuda"], "--backend cuda", "not available")


def test_sample_module_factory_and_odd_shape(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(SAMPLE + ["--out", str(out), "--model", f"{__name__}:make_model", "--shape", "3,5", "-n", "2",
                          "--sampler", "dpmpp_2s_ancestral", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "2 samples of shape (3, 5)" in text and "1 step," in text
    files = sorted(p for p in os.listdir(out) if p.endswith(".pt"))
    assert len(files) == 2
    for p in files:
        assert torch.isfinite(torch.load(out / p)["sample"].float()).all()


BENCH = ["bench", "--parts", "loop", "--shape", "2,3", "--steps", "1", "--repeats", "1", "--samplers", "euler",
         "--threads", "1", "--json", ""]


@pytest.mark.parametrize("extra, needles", [
    (["--shape", "5"], ["--shape", "'5'"]),
    (["--steps", "0"], ["--steps must be >= 1"]),
    (["--repeats", "0"], ["--repeats must be >= 1"]),
    (["--step-repeats", "0"], ["--step-repeats must be >= 1"]),
    (["--threads", "-1"], ["--threads"]),
    (["--samplers", "bogus"], ["--samplers", "'bogus'"]),
    (["--backends", "bogus"], ["--backends", "'bogus'"]),
    (["--parts", "loop,nope"], ["--parts", "'loop,nope'"]),
    (["--dtypes", "fp64"], ["--dtypes"]),
])
def test_bench_bad_arguments(capsys, extra, needles):
    _fails(capsys, BENCH + extra, *needles)


def test_bench_bad_output_paths(tmp_path, capsys):
    _fails(capsys, BENCH[:-1] + [str(tmp_path)], "--json", "is a directory")
    _fails(capsys, BENCH[:-1] + [str(tmp_path / "b.json"), "--png", str(tmp_path)], "--png", "is a directory")
    assert not (tmp_path / "b.json").exists()


def test_bench_unavailable_backend_is_an_argument_error(capsys):
    from fastdiff.runtime import ops

    if ops.backend_status("triton")[0]:
        pytest.skip("triton runs here")
    _fails(capsys, BENCH + ["--backends", "reference,triton"], "--backends triton", "not available")


def test_bench_png_path_without_extension_is_written_as_given(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastdiff.backends import cpu

    chart = tmp_path / "chart"
    c = getattr(cpu, "_C", None)
    n, k = torch.get_num_threads(), (c.num_threads() if c is not None else None)
    try:  # --threads 1 sets both thread counts for the process: put them back
        assert main(BENCH[:-1] + [str(tmp_path / "b.json"), "--png", str(chart), "--samplers", "euler,"]) == 0
    finally:
        torch.set_num_threads(n)
        if k is not None:
            c.set_num_threads(k)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "chart.png").exists()
    doc = json.loads((tmp_path / "b.json").read_text())
    assert not doc["errors"] and doc["chart"] == str(chart)
    assert all(math.isfinite(r["us_per_step"]) and r["us_per_step"] > 0 for r in doc["loop"])
    capsys.readouterr()


def test_info_names_a_bad_backend_variable(capsys, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    assert main(["info"]) == 0
    assert "FASTDIFF_BACKEND=bogus (not a backend" in capsys.readouterr().out


def test_argparse_errors_exit_2(capsys):
    for argv in (["bench", "--bogus"], ["profile", "--dtype", "int8"], ["sample"], ["nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
