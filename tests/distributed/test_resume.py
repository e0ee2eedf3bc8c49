"""Resuming a folder of samples never mixes two sets (issue 13): ``distributed.sample(resume=True)``
and ``fastdiff sample --resume`` record every setting that determines the samples in a manifest and
refuse, naming it, anything that differs; a damaged sample file is sampled again, a foreign one is
refused; a run killed part-way completes byte-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdiff import distributed as D
from fastdiff.distributed import manifest
from fastdiff.cli import main as cli_main
from fastdiff.distributed.manifest import ManifestError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = [5, 6, 7, 8]


def files_of(d) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


class Net(torch.nn.Module):
    def __init__(self, w: float = 0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), w))

    def forward(self, x, t):
        return torch.tanh(x) * self.w


def _run(d, model=None, **kw):
    args = dict(seeds=SEEDS, out_dir=d, sampler="euler_ancestral", steps=3, backend="reference")
    args.update(kw)
    return D.sample(model if model is not None else Net(), (3,), **args)


@pytest.mark.parametrize("change, named", [
    (dict(sampler="dpmpp_2m"), "settings.sampler"),
    (dict(steps=4), "settings.steps"),
    (dict(schedule={"beta_schedule": "scaled_linear"}), "settings.schedule"),
    (dict(eta=0.5), "settings.eta"),
    (dict(model=Net(0.25)), "model.state_dict_sha256"),
    (dict(model_id="net v1"), "model"),
    (dict(seeds=[5, 6, 7, 9]), "samples.seeds_sha256"),
    (dict(dtype=torch.float64), "samples.dtype"),
    (dict(record={"note": "x"}), "run.note"),
])
def test_resume_refuses_every_changed_setting_by_name(tmp_path, change, named):
    d = str(tmp_path / "o")
    _run(d)
    before = files_of(d)
    with pytest.raises(ManifestError, match=named.replace(".", r"\.")):
        _run(d, resume=True, **change)
    assert files_of(d) == before  # nothing written or removed


def test_resume_with_the_same_settings_completes_byte_identically(tmp_path):
    d, ref = str(tmp_path / "o"), str(tmp_path / "ref")
    _run(ref)
    _run(d)
    names = sorted(f for f in os.listdir(d) if f.endswith(".pt"))
    os.remove(os.path.join(d, names[1]))
    open(os.path.join(d, names[2]), "wb").close()  # a zero-byte file: not a sample, sampled again
    with open(os.path.join(d, names[3]), "r+b") as f:  # truncated
        f.truncate(20)
    with pytest.warns(UserWarning, match="sampled again"):
        _run(d, resume=True)
    assert files_of(d) == files_of(ref)


def test_a_sample_file_of_another_shape_or_seed_is_refused(tmp_path):
    d = str(tmp_path / "o")
    _run(d)
    p = D.sample_path(d, 0, SEEDS[0], len(SEEDS))
    torch.save({"sample": torch.zeros(4), "index": 0, "seed": SEEDS[0]}, p)
    with pytest.raises(ValueError, match="shape"):
        _run(d, resume=True)
    torch.save({"sample": torch.zeros(3), "index": 1, "seed": SEEDS[0]}, p)
    with pytest.raises(ValueError, match="index"):
        _run(d, resume=True)


def test_samples_without_a_manifest_are_refused(tmp_path):
    d = str(tmp_path / "o")
    _run(d)
    os.remove(os.path.join(d, manifest.FILE))
    before = files_of(d)
    with pytest.raises(ManifestError, match="no manifest"):
        _run(d, resume=True, sampler="ddim")
    assert files_of(d) == before  # no new manifest written either


def test_bad_model_id_and_record_are_refused_before_anything_is_written(tmp_path):
    d = tmp_path / "o"
    with pytest.raises(TypeError, match="model_id"):
        _run(str(d), model_id=5)
    with pytest.raises(TypeError, match="record"):
        _run(str(d), record=["x"])
    assert not d.exists()


# --- the command line ---------------------------------------------------------------------------

CLI = ["sample", "--model", "gmm", "--sampler", "euler_ancestral", "--steps", "4", "--shape", "2", "-n", "6",
       "--seed", "3", "--batch-size", "2", "--backend", "reference"]


def test_cli_refuses_a_changed_schedule_file_and_sampler_and_a_deleted_manifest(tmp_path, capsys):
    d, sched = str(tmp_path / "o"), tmp_path / "s.json"
    sched.write_text(json.dumps({"beta_schedule": "linear"}))
    assert cli_main(CLI + ["--schedule", str(sched), "--out", d]) == 0
    capsys.readouterr()
    before = files_of(d)
    sched.write_text(json.dumps({"beta_schedule": "scaled_linear"}))  # same path, other content
    assert cli_main(CLI + ["--schedule", str(sched), "--out", d, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--schedule beta_schedule was 'linear', now 'scaled_linear'" in err and len(err.splitlines()) == 1, err
    sched.write_text(json.dumps({"beta_schedule": "linear"}))
    assert cli_main(CLI + ["--schedule", str(sched), "--out", d, "--resume", "--sampler", "ddim"]) == 2
    assert "--sampler was 'euler_ancestral', now 'ddim'" in capsys.readouterr().err
    os.remove(os.path.join(d, manifest.FILE))
    assert cli_main(CLI + ["--schedule", str(sched), "--out", d, "--resume", "--sampler", "ddim"]) == 2
    assert "no manifest" in capsys.readouterr().err
    del before[manifest.FILE]
    assert files_of(d) == before


def test_cli_refuses_changed_weights_of_a_module_model(tmp_path, capsys, monkeypatch):
    d = str(tmp_path / "o")
    monkeypatch.setenv("FD_TEST_W", "0.5")
    argv = CLI + ["--model", "tests.distributed.test_resume:make_net", "--out", d]
    assert cli_main(argv) == 0
    monkeypatch.setenv("FD_TEST_W", "0.25")
    assert cli_main(argv + ["--resume"]) == 2
    assert "model.state_dict_sha256 was" in capsys.readouterr().err


def make_net():
    """``--model tests.distributed.test_resume:make_net``: a module whose weight comes from ``FD_TEST_W``."""
    return _Net2(float(os.environ.get("FD_TEST_W", "0.5")))


class _Net2(torch.nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2,), w))

    def forward(self, x, t):
        return torch.tanh(x) * self.w


def slow_model(x, t):
    """``--model tests.distributed.test_resume:slow_model``: slow enough to be killed part-way."""
    time.sleep(0.05)
    return torch.tanh(x) * 0.5


def test_cli_killed_part_way_then_resumed_is_byte_identical(tmp_path):
    ref, d = str(tmp_path / "ref"), str(tmp_path / "o")
    argv = ["sample", "--model", "tests.distributed.test_resume:slow_model", "--sampler", "euler_ancestral", "--steps", "6",
            "--shape", "2", "-n", "12", "--seed", "1", "--batch-size", "2", "--backend", "reference"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTDIFF_BACKEND", None)
    subprocess.run([sys.executable, "-m", "fastdiff", *argv, "--out", ref], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    p = subprocess.Popen([sys.executable, "-m", "fastdiff", *argv, "--out", d], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 60:
        if os.path.isdir(d) and sum(f.endswith(".pt") for f in os.listdir(d)) >= 4:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = sum(f.endswith(".pt") for f in os.listdir(d))
    assert 4 <= done < 12
    r = subprocess.run([sys.executable, "-m", "fastdiff", *argv, "--out", d, "--resume"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert files_of(d) == files_of(ref)


def test_the_backend_auto_resolves_to_is_recorded(tmp_path, monkeypatch):
    from fastdiff.runtime import ops

    if not ops.backend_status("cpu")[0]:
        pytest.skip("no cpu backend: auto is reference here")
    d = str(tmp_path / "o")
    _run(d, backend="auto")
    assert json.load(open(os.path.join(d, manifest.FILE)))["samples"]["backend"] == "cpu"
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")  # auto now resolves to another backend
    with pytest.raises(ManifestError, match=r"samples\.backend was 'cpu', now 'reference'"):
        _run(d, backend="auto", resume=True)
