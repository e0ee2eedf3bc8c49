"""``fastdiff bench``: the documented JSON, the PNG chart, the tables; tiny shapes so it runs in seconds.

Speed is never asserted here: the numbers come from a loaded CI machine at toy sizes.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import torch

from fastdiff import bench
from fastdiff.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--threads", "1", "--shape", "2,4,8,8", "--step-shapes", "2,4,8,8", "--samplers", "euler,dpmpp_2m",
        "--step-repeats", "2"]


@contextlib.contextmanager
def _threads_kept():
    from fastdiff.backends import cpu

    n, c = torch.get_num_threads(), getattr(cpu, "_C", None)
    k = c.num_threads() if c is not None else None
    try:
        yield
    finally:
        torch.set_num_threads(n)
        if k is not None:
            c.set_num_threads(k)


def _run(argv) -> tuple[int, str]:
    out = io.StringIO()
    with _threads_kept(), contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``fastdiff bench --quick`` on tiny shapes (every part that can run here)."""
    pytest.importorskip("diffusers")
    d = tmp_path_factory.mktemp("bench")
    path = d / "bench.json"
    rc, text = _run(["bench", "--quick", *TINY, "--json", str(path)])
    with open(path) as f:
        doc = json.load(f)
    return rc, text, doc, d


def _has_fields(row: dict, section: str) -> None:
    if "error" in row:
        assert isinstance(row["error"], str) and row["error"]
        return
    missing = [k for k in bench.FIELDS[section] if k not in row]
    assert not missing, f"{section} row lacks {missing}: {row}"


def test_quick_completes(quick):
    rc, text, doc, _ = quick
    assert rc == 0, text
    assert doc["quick"] is True
    assert doc["errors"] == {}
    ran = {"loop", "floor", "step", "samplers", "pipeline"} | ({"gpu"} if torch.cuda.is_available() else set())
    assert ran <= set(doc["elapsed_s"])
    if not torch.cuda.is_available():
        assert doc["gpu"] is None and "gpu" in doc["skipped"]


def test_json_has_the_documented_fields(quick):
    _, _, doc, _ = quick
    assert set(bench.FIELDS["top"]) <= set(doc)
    assert doc["schema"] == bench.SCHEMA
    assert set(bench.FIELDS["machine"]) <= set(doc["machine"])
    assert doc["command"].startswith("fastdiff bench --quick")
    assert {(r["sampler"], r["backend"]) for r in doc["loop"]} >= {("euler", "reference"), ("dpmpp_2m", "reference")}
    for section in ("loop", "floor", "step", "samplers"):
        assert doc[section], section
        for r in doc[section]:
            _has_fields(r, section)
    methods = {r["method"] for r in doc["step"]}
    assert {"reference", "diffusers", "compiled", "cpu", "cpu+dispatch"} <= methods
    ok = [r for r in doc["step"] if "error" not in r]
    assert ok and all(r["copy_gb_s"] > 0 and 0 < r["frac_of_copy"] for r in ok)
    assert all(r["shape"] == [2, 4, 8, 8] for r in doc["step"] + doc["samplers"])
    floor = doc["floor"]
    assert {r["sampler"] for r in floor} == {"euler", "dpmpp_2m"}  # --samplers applies
    for r in floor:  # the stock loops ran beside fastdiff; the floor is bytes over a measured bandwidth
        assert r["diffusers_us"] > 0 and r["k_diffusion_us"] > 0 and r["fastdiff_us"] > 0
        assert r["floor_us"] == pytest.approx(r["bytes_per_step"] / (r["copy_gb_s"] * 1e3))
        assert r["vs_diffusers"] == pytest.approx(r["diffusers_us"] / r["fastdiff_us"])
        n = 1
        for v in r["shape"]:
            n *= v
        per_row = r["bytes_per_step"] * r["steps"] / r["rows"] / n  # bytes per element
        # guided fp32 rows: read x, both model halves (and a history slot), write x, 2 model inputs (and a slot);
        # the first row reads no history and the last writes no model input
        lo, hi = (24, 32) if r["sampler"] == "dpmpp_2m" else (20, 24)
        assert lo <= per_row <= hi, per_row
    rows = doc["pipeline"]
    assert [r["kind"] for r in rows] == ["sd", "flux", "wan"]  # one row per pipeline, none failed
    assert [r["pipeline"] for r in rows] == ["StableDiffusionPipeline", "FluxPipeline", "WanPipeline"]
    for r in rows:
        assert "error" not in r, r
        _has_fields(r, "pipeline")
        assert r["steps"] == 4 and r["guidance_scale"] == 7.5
        for pre in ("stock", "fused"):  # the step splits into the model's forward and the scheduler's rest
            assert r[f"{pre}_us_per_step"] > r[f"{pre}_model_us_per_step"] > 0 and r[f"{pre}_sched_us_per_step"] > 0
            assert 0 < r[f"{pre}_sched_share"] < 1
        assert r["sched_speedup"] == pytest.approx(r["stock_sched_us_per_step"] / r["fused_sched_us_per_step"])
    # the latents the loop steps, at the quick settings' 8x8: SD's, Flux's packed into 16 tokens of 16, Wan's video
    assert [r["latent"] for r in rows] == [[1, 4, 8, 8], [1, 16, 16], [1, 4, 2, 8, 8]]
    assert {r["model"] for r in rows} == {"UNet2DConditionModel", "FluxTransformer2DModel", "WanTransformer3DModel"}
    if doc["gpu"] is not None:
        assert set(bench.FIELDS["gpu"]) <= set(doc["gpu"])
        for r in doc["gpu"]["rows"]:
            if r["provider"] in ("triton", "cuda"):  # the fused backends' prepared programs always time
                assert "error" not in r, r
            if "error" not in r:  # (a provider torch.compile cannot build here says why instead)
                _has_fields(r, "gpu_rows")


def test_gpu_timing_rotates_enough_argument_sets_to_keep_l2_cold():
    from fastdiff.bench.step import GPU_MAX_SETS, rotation

    l2 = 50 * 2**20
    for nbytes in (1, 4096, 2**20, 10 * 2**20, 49 * 2**20, 50 * 2**20, 151 * 2**20, 2**31):
        n = rotation(nbytes, l2)
        assert 2 <= n <= GPU_MAX_SETS
        if n < GPU_MAX_SETS:  # the sets together are at least 3 L2s, and one set fewer would not be
            assert n * nbytes >= 3 * l2 and (n == 2 or (n - 1) * nbytes < 3 * l2), (nbytes, n)


def test_every_json_field_is_documented():
    doc = bench.__doc__
    for section, names in bench.FIELDS.items():
        for name in names:
            assert f"``{name}``" in doc, f"{section} field {name!r} is not in fastdiff.bench's docstring"


def test_png_is_written(quick):
    _, text, doc, d = quick
    png = d / "bench.png"
    assert doc["chart"] == str(png)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    assert f"wrote {png}" in text


def test_table_prints(quick):
    _, text, doc, _ = quick
    for title in ("Sampling loop", "Whole CFG loop", "One CFG DPM++(2M) step", "Fused step per sampler",
                  "Pipeline denoising loop", "StableDiffusionPipeline", "FluxPipeline", "WanPipeline"):
        assert title in text
    for word in ("euler", "dpmpp_2m", "reference", "cpu+dispatch", "compiled", "diffusers", "µs/step", "vs ref"):
        assert word in text


def test_plain_table_without_rich(quick, monkeypatch):
    _, _, doc, _ = quick
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    monkeypatch.setitem(sys.modules, "rich.console", None)
    out = io.StringIO()
    bench.print_tables(doc, file=out)
    text = out.getvalue()
    assert "┃" not in text and "Sampling loop" in text and "dpmpp_2m" in text
    assert text == bench.format_plain(doc) + "\n"


def test_chart_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "s.json"
    rc, text = _run(["bench", "--parts", "samplers", *TINY, "--json", str(path)])
    assert rc == 0, text
    assert "chart skipped: matplotlib is not installed" in text
    doc = json.loads(path.read_text())
    assert doc["chart"] is None and not (tmp_path / "s.png").exists()
    assert doc["loop"] is None and doc["samplers"]


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "--step-shapes", "2,x", "--json", ""]) == 2
    assert "--step-shapes" in capsys.readouterr().err
    assert main(["bench", "--parts", "loop,nope", "--json", ""]) == 2
