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
