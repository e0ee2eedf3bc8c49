"""The profiler: its parts add up, it counts host syncs, its trace and JSON are well formed."""

import json
import time

import pytest
import torch

import fastdiff.bench.profile as prof
from fastdiff.cli import main as cli_main
from fastdiff.runtime.loop import LoopOptions, run_plan
from fastdiff.bench.timing import RegionTimer, SyncCounter

from .._plans import edm_euler


def slow_model(x, t, c=None):
    # a model with a measurable, known cost: 2 ms of sleep plus real work
    time.sleep(0.002)
    return torch.tanh(x) * 0.5


def test_parts_sum_to_measured_wall_time():
    plan = edm_euler(12)
    timer = RegionTimer("cpu")
    x = torch.randn(4, 3, 16, 16) * plan.init_scale
    t0 = time.perf_counter()
    run_plan(plan, slow_model, x, LoopOptions(seeds=list(range(4)), backend="reference", timer=timer))
    wall = time.perf_counter() - t0
    timer.finish()
    rep = prof._summarise("t", "reference", timer, len(plan.rows), SyncCounter())
    total_s = rep.total_us * len(plan.rows) / 1e6
    assert abs(total_s - wall) <= 0.10 * wall, (total_s, wall)
    # the model's known 2 ms per call is attributed to the model part
    assert rep.parts_us["model"] >= 2000.0
    assert abs(sum(rep.parts_us.values()) - rep.total_us) < 1e-6 * rep.total_us


def test_counts_a_deliberately_inserted_host_sync():
    plan = edm_euler(5)

    def syncing_model(x, t):
        if x.abs().max().item() > 1e9:  # one host sync per call
            raise AssertionError
        return x * 0.3

    with SyncCounter() as clean:
        run_plan(plan, lambda x, t: x * 0.3, torch.randn(2, 8), LoopOptions(backend="reference"))
    with SyncCounter() as dirty:
        run_plan(plan, syncing_model, torch.randn(2, 8), LoopOptions(backend="reference"))
    assert dirty.count - clean.count == 5
    assert "item" in dirty.where


def test_report_trace_and_cli_json(tmp_path):
    trace = tmp_path / "trace.json"
    out = tmp_path / "profile.json"
    rc = cli_main(["profile", "--shape", "1,4,8,8", "--steps", "4", "--sampler", "euler",
                   "--trace", str(trace), "--json", str(out), "--warmup", "0"])
    assert rc == 0
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all({"name", "ts", "dur", "pid", "tid"} <= set(e) for e in spans)
    assert {e["name"] for e in spans} >= {"model", "step"}
    doc = json.loads(out.read_text())
    assert {"sampler", "steps", "shape", "dtype", "device", "guidance_scale", "parts", "variants", "skipped"} <= set(doc)
    names = [v["name"] for v in doc["variants"]]
    assert "fastdiff reference" in names and "diffusers scheduler" in names
    for v in doc["variants"]:
        assert set(v["parts_us"]) == set(prof.PARTS)
        assert len(v["per_row_us"]) == v["rows"]
        assert 0.0 <= v["sampler_share"] <= 1.0 and v["syncs"] >= 0
    ref = next(v for v in doc["variants"] if v["name"] == "fastdiff reference")
    assert ref["parts_us"]["guidance"] > 0  # CFG blend timed inside the reference step


def test_profile_rejects_unknown_variant():
    import pytest

    with pytest.raises(ValueError, match="variants"):
        prof.profile(sampler="euler", steps=2, shape=(1, 4), variants=("nope",), warmup=0)


def test_parts_of_a_step_run_inside_another_region_are_not_counted_twice():
    # pc's Langevin corrector runs a reference step inside the loop's "guidance" region (its step
    # size); that step's phases used to be taken out of "step", which went negative
    rep = prof.profile(sampler="pc", steps=2, shape=(1, 3), variants=("reference",), warmup=0)
    for v in rep.variants:
        assert all(us >= 0.0 for row in v.per_row_us for us in row.values()), v.per_row_us
        assert abs(sum(v.parts_us.values()) - v.total_us) <= 1e-6 * v.total_us


def test_region_timer_records_the_enclosing_region():
    timer = RegionTimer("cpu")
    timer.start_row(0)
    with timer.region("guidance"):
        with timer.region("step/noise"):
            pass
    timer.finish()
    assert [(r[1], r[5]) for r in timer.records] == [("step/noise", "guidance"), ("guidance", None)]



@pytest.mark.parametrize("sampler", ["flow_euler", "flow_heun", "heun", "lms", "unipc"])
def test_diffusers_variant_of_every_mirrored_scheduler_runs(sampler):
    # flow-matching schedulers have no init_noise_sigma / scale_model_input; Heun, LMS and UniPC's
    # step() takes no generator: each used to raise
    pytest.importorskip("diffusers")
    rep = prof.profile(sampler=sampler, steps=2, shape=(1, 3), variants=("diffusers",), warmup=0)
    assert [v.name for v in rep.variants] == ["diffusers scheduler"] and rep.variants[0].total_us > 0


# ------------------------------------------------------------------ fastdiff profile --pipeline

def test_profile_pipeline_cli_json(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "pipe.json"
    rc = cli_main(["profile", "--pipeline", "tests.bench._pipelines:flux", "--steps", "2", "--warmup", "0",
                   "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "FluxPipeline" in text and "stock rest" in text and "fastdiff rest" in text
    doc = json.loads(out.read_text())
    assert {"pipeline", "scheduler", "model", "steps", "latent", "dtype", "device", "call_kwargs", "parts",
            "variants"} <= set(doc)
    assert doc["pipeline"] == "FluxPipeline" and doc["steps"] == 2 and doc["latent"] == [1, 16, 16]
    assert doc["parts"] == list(prof.PIPELINE_PARTS)
    assert "output_type" in doc["call_kwargs"] and "true_cfg_scale" in doc["call_kwargs"]
    stock, fused = doc["variants"]
    assert stock["backend"] == "diffusers" and fused["name"].startswith("fastdiff ")
    # true CFG: the stock Flux loop calls the transformer once per branch, the accelerated one once per step
    assert (stock["model_calls"], fused["model_calls"]) == (4, 2)
    for v in doc["variants"]:
        assert v["unit"] == "step" and v["rows"] == 2 and len(v["per_row_us"]) == 2
        assert set(v["parts_us"]) == set(prof.PIPELINE_PARTS)
        assert all(r["model"] > 0 and r["rest"] > 0 for r in v["per_row_us"])
        assert v["total_us"] == pytest.approx(sum(v["parts_us"].values()))
        assert 0.0 < v["sampler_share"] < 1.0 and v["setup_us"] > 0


def test_profile_bare_pipeline_is_called_with_a_prompt(capsys):
    pytest.importorskip("diffusers")
    rep = prof.profile_pipeline(*prof.load_pipeline("tests.bench._pipelines:sd_bare"), steps=1, warmup=0)
    assert "prompt" in rep.call_kwargs and rep.latent == (1, 4, 8, 8)
    assert [v.model_calls for v in rep.variants] == [1, 1]  # CFG batched in both loops


@pytest.mark.parametrize("extra, needles", [
    (["--pipeline", "tests.bench._pipelines:nope"],
     ["--pipeline 'tests.bench._pipelines:nope'", "no attribute 'nope'"]),
    (["--pipeline", "tests.bench._pipelines"], ["--pipeline must be 'module:attr'"]),
    (["--pipeline", "no_such_module_fd:f"], ["--pipeline", "cannot import 'no_such_module_fd'"]),
    (["--pipeline", "os:sep"], ["--pipeline 'os:sep'", "not a diffusers pipeline"]),
    (["--pipeline", "tests.bench._pipelines:not_a_pipeline"], ["--pipeline", "gave (object, dict)"]),
    (["--pipeline", "tests.bench._pipelines:bad_call"], ["--pipeline", "the pipeline call failed", "no_such_argument"]),
    (["--pipeline", "tests.bench._pipelines:flux", "--shape", "1,4"], ["--shape does not apply to --pipeline"]),
    (["--pipeline", "tests.bench._pipelines:flux", "--model", "os:sep"], ["--model and --pipeline"]),
    (["--pipeline", "tests.bench._pipelines:flux", "--steps", "0"], ["--steps must be >= 1"]),
])
def test_profile_pipeline_bad_arguments(capsys, extra, needles):
    pytest.importorskip("diffusers")
    assert cli_main(["profile", "--warmup", "0", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastdiff profile: error: "), err
    for n in needles:
        assert n in err, (n, err)
