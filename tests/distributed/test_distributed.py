"""fastdiff.distributed: sharding, bit-identity with one process, failure propagation, resume, CLI.

Multi-process tests start real gloo ranks on loopback (MASTER_ADDR=127.0.0.1, a free port) as
subprocesses of ``tests/distributed/_dist_worker.py`` or of the command line (or torchrun), each under a
timeout, so a hang fails the test instead of hanging CI. A failed peer (raised, SIGKILLed, or
SIGSTOPped: a hung host whose connections stay open) must make every surviving rank exit with
status 1, by itself (no signal, no abort), within ``timeout`` plus :data:`EXIT_MARGIN_S`, with one
line on stderr naming the peer.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import fastdiff
from fastdiff import distributed as D
from fastdiff.runtime import ops
from fastdiff.cli import main as cli_main

from ._dist_worker import MODEL_ID, SHAPE, make_model
from .._plans import edm_euler_ancestral

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS7 = [11, 2**63 + 5, 3, 2**40, 7, 0, 99]  # includes a seed >= 2**63 (negative as int64)
STEPS = 4
EXIT_MARGIN_S = 25.0
"""Survivors of a stopped rank exit within ``timeout`` + this many seconds of the stop: the rest of
their own chunk, the store's reply limit when the stopped rank hosts the store, the interpreter's
exit -- on two busy cores (typically 1-4 s in all)."""


def reference(seeds, conds=None, shape=SHAPE):
    """One process sampling the whole batch with fastdiff.sample."""
    return fastdiff.sample(make_model(shape), D.initial_noise(shape, seeds), seed=seeds, cond=conds,
                           plan=edm_euler_ancestral(STEPS), backend="reference")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTDIFF_BACKEND", None)
    return env


def run_ranks(world: int, argv: list[str], timeout: float = 40.0, hung: set[int] = frozenset(),
              env: dict | None = None):
    """Start ``world`` processes of ``argv`` as ranks 0..world-1 of one loopback job.

    Returns ``[(returncode, stderr)]``, the wall time and each rank's exit time (``time.monotonic()``
    when it was seen to exit). Ranks in ``hung`` are expected never to finish: once every other rank
    has exited they are killed and reported with returncode ``None``. A rank still running after
    ``timeout`` seconds fails the test.
    """
    port = free_port()
    procs = [subprocess.Popen(argv, cwd=ROOT, env={**rank_env(r, world, port), **(env or {})},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
    t0 = time.monotonic()
    exits: list[float | None] = [None] * world
    killed = set()
    try:
        while True:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if exits[r] is None and p.poll() is not None:
                    exits[r] = now
            if all(exits[r] is not None for r in range(world) if r not in hung):
                break
            if now - t0 > timeout:
                raise AssertionError(f"ranks {[r for r in range(world) if exits[r] is None]} still running after "
                                     f"{timeout}s: a hang")
            time.sleep(0.02)
        wall = time.monotonic() - t0
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                p.kill()  # SIGKILL ends a SIGSTOPped process too
                killed.add(r)
    results = []
    for r, p in enumerate(procs):
        err = p.communicate(timeout=10)[1]
        results.append((None if r in killed else p.returncode, err))
    return results, wall, exits


def launch(world: int, cfg: dict, timeout: float = 40.0, hung: set[int] = frozenset(), env: dict | None = None):
    """Run ``world`` ranks of the worker (see :func:`run_ranks`); ``[(returncode, stderr)]`` and the wall time."""
    results, wall, _ = run_ranks(world, [sys.executable, "-m", "tests.distributed._dist_worker", json.dumps(cfg)], timeout, hung,
                                 env)
    return results, wall


def assert_one_error_line(err: str, want: str) -> None:
    """``err`` (a survivor's stderr) is one line, and it holds ``want``: no traceback, no abort, no warnings."""
    assert "Traceback" not in err and "terminate called" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n" + err[-3000:]
    assert want in lines[0], f"{want!r} not in {lines[0]!r}"


def files_of(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


# --- in-process: sharding, one process, errors -----------------------------------------------


@pytest.mark.parametrize("n,world", [(7, 3), (2, 3), (1, 1), (10, 4), (5, 5), (3, 8), (100, 7)])
def test_shard_is_contiguous_balanced_and_covers_every_index(n, world):
    parts = [D.shard(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_errors_name_the_argument():
    with pytest.raises(ValueError, match="world must be an int >= 1, got 0"):
        D.shard(3, 0, 0)
    with pytest.raises(ValueError, match=r"rank must be < world \(2\), got 2"):
        D.shard(3, 2, 2)


def test_model_of_these_tests_is_batch_invariant():
    # The precondition of bit-identity: a sample's model output does not depend on its batch.
    m = make_model()
    x, t = torch.randn(7, *SHAPE), torch.rand(7) * 5 + 0.1
    full = m(x, t)
    assert all(torch.equal(m(x[i:i + 1].clone(), t[i:i + 1].clone()), full[i:i + 1]) for i in range(7))


def test_world_of_one_equals_fastdiff_sample_bit_for_bit():
    conds = torch.linspace(-1, 1, 7)
    ref = reference(SEEDS7, conds)
    out = D.sample(make_model(), SHAPE, seeds=SEEDS7, conds=conds, plan=edm_euler_ancestral(STEPS), backend="reference")
    assert torch.equal(out, ref)
    # chunks of 3, per-sample conds as a list, the global noise as a tensor: the same bits
    out = D.sample(make_model(), D.initial_noise(SHAPE, SEEDS7), seeds=SEEDS7, conds=list(conds), batch_size=3,
                   plan=edm_euler_ancestral(STEPS), backend="reference")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_shares_sampled_apart_equal_the_whole_batch_on_each_backend(backend):
    # What sharding relies on, per backend: a sample's bits do not depend on its batch or position.
    ok, why = ops.backend_status(backend)
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    for dtype in (torch.float32, torch.float64):
        def run(seeds):
            return fastdiff.sample(make_model(), D.initial_noise(SHAPE, seeds, dtype=dtype), seed=seeds,
                                   plan=edm_euler_ancestral(STEPS), backend=backend)
        whole = run(SEEDS7)
        parts = [run(SEEDS7[a:b]) for a, b in ((0, 3), (3, 5), (5, 7), (6, 7))]
        assert torch.equal(torch.cat(parts[:3]), whole) and torch.equal(parts[3], whole[6:])


def test_initial_noise_is_keyed_by_seed_alone():
    a = D.initial_noise(SHAPE, SEEDS7)
    assert torch.equal(D.initial_noise(SHAPE, SEEDS7[2:5]), a[2:5])
    assert torch.equal(a, fastdiff.core.rng.randn((7, *SHAPE), SEEDS7, row=D.INIT_ROW))
    assert not torch.equal(a, fastdiff.core.rng.randn((7, *SHAPE), SEEDS7, row=0))  # not the first solver row's noise


def test_out_dir_writes_one_atomic_file_per_sample_and_resume_skips_existing(tmp_path):
    d = tmp_path / "out"
    calls = []

    def counting(x, t, cond=None):
        calls.append(x.shape[0])
        return make_model()(x, t, cond)

    kw = dict(seeds=SEEDS7, out_dir=d, batch_size=2, plan=edm_euler_ancestral(STEPS), backend="reference")
    paths = D.sample(counting, SHAPE, **kw)
    assert paths == [D.sample_path(d, i, s, 7) for i, s in enumerate(SEEDS7)]
    assert os.path.basename(paths[1]) == f"000001-seed{2**63 + 5}.pt"
    ref = reference(SEEDS7)
    for i, p in enumerate(paths):
        rec = D.load_sample(p)
        assert rec["index"] == i and rec["seed"] == SEEDS7[i] and torch.equal(rec["sample"], ref[i])
    # no temporary files left; the manifest records the settings
    assert sorted(os.listdir(d)) == sorted([D.manifest.FILE, *(os.path.basename(p) for p in paths)])
    before = files_of(d)

    with pytest.raises(FileExistsError, match="already holds 7 of this rank's sample files.*resume=True"):
        D.sample(counting, SHAPE, **kw)
    os.remove(paths[2])
    os.remove(paths[5])
    (d / f".{os.path.basename(paths[5])}.abc123.tmp").write_bytes(b"partial")  # a killed writer's leftover
    calls.clear()
    D.sample(counting, SHAPE, resume=True, **kw)
    assert sum(calls) == 2 * STEPS  # only the two missing samples were sampled
    assert files_of(d) == before  # byte for byte, stale temporary file removed


def test_gather_modes_in_one_process():
    kw = dict(seeds=[5, 6], plan=edm_euler_ancestral(STEPS), backend="reference")
    ref = reference([5, 6])
    assert torch.equal(D.sample(make_model(), SHAPE, gather="rank0", **kw), ref)
    assert torch.equal(D.sample(make_model(), SHAPE, gather="none", **kw), ref)


def test_argument_errors_name_the_argument_and_value(tmp_path):
    m = make_model()
    with pytest.raises(ValueError, match="seeds must not be empty"):
        D.sample(m, SHAPE, seeds=[])
    with pytest.raises(TypeError, match=r"seeds\[1\] must be an int, got 2.5"):
        D.sample(m, SHAPE, seeds=[1, 2.5])
    with pytest.raises(TypeError, match=r"seeds\[0\] must be an int, got True"):
        D.sample(m, SHAPE, seeds=[True])
    with pytest.raises(ValueError, match=r"seeds\[0\] must fit in 64 bits, got 18446744073709551616"):
        D.sample(m, SHAPE, seeds=[2**64])
    with pytest.raises(TypeError, match="seeds must be a sequence of ints.*got 5"):
        D.sample(m, SHAPE, seeds=5)
    with pytest.raises(TypeError, match="does not take seed=: give the global list as seeds="):
        D.sample(m, SHAPE, seeds=[1], seed=1)
    with pytest.raises(TypeError, match="does not take generator="):
        D.sample(m, SHAPE, seeds=[1], generator=torch.Generator())
    with pytest.raises(TypeError, match="does not take cond=: give the global per-sample conditions as conds="):
        D.sample(m, SHAPE, seeds=[1], cond=torch.zeros(1))
    with pytest.raises(ValueError, match="gather must be 'all', 'rank0' or 'none', got 'some'"):
        D.sample(m, SHAPE, seeds=[1], gather="some")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 or None, got 0"):
        D.sample(m, SHAPE, seeds=[1], batch_size=0)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0, got -1"):
        D.sample(m, SHAPE, seeds=[1], timeout=-1)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        D.sample(m, SHAPE, seeds=[1], resume=True)
    with pytest.raises(ValueError, match=r"noise tensor must be \[N, ...\] with N = len\(seeds\) = 2, "
                                         r"got shape \(3, 2\)"):
        D.sample(m, torch.zeros(3, 2), seeds=[1, 2])
    with pytest.raises(ValueError, match=r"noise shape must be ints >= 1, got \(3, 0\)"):
        D.sample(m, (3, 0), seeds=[1])
    with pytest.raises(TypeError, match="noise must be the shape of one sample.*got 3"):
        D.sample(m, 3, seeds=[1])
    with pytest.raises(ValueError, match=r"conds must have one entry per seed \(2\), got shape \(3,\)"):
        D.sample(m, SHAPE, seeds=[1, 2], conds=torch.zeros(3))
    with pytest.raises(ValueError, match="unconds has 1 entries but seeds has 2"):
        D.sample(m, SHAPE, seeds=[1, 2], unconds=[torch.zeros(1)])
    with pytest.raises(ValueError, match=r"conds\['y'\] must have one entry per seed \(2\), got shape \(1,\)"):
        D.sample(m, SHAPE, seeds=[1, 2], conds={"y": torch.zeros(1)})


def test_model_error_in_one_process_propagates_unchanged():
    m = make_model(fail_rank=0, fail_call=1)
    with pytest.raises(ValueError, match="injected failure at model call 1"):
        D.sample(m, SHAPE, seeds=[1, 2], plan=edm_euler_ancestral(STEPS), backend="reference")


# --- several gloo processes on loopback --------------------------------------------------------


def test_three_ranks_uneven_split_and_more_ranks_than_samples_are_bit_identical(tmp_path):
    res = str(tmp_path / "{job}-r{{rank}}.pt")
    jobs = [{"seeds": SEEDS7, "conds": True, "result": res.format(job="seven")},  # 3 + 2 + 2
            {"seeds": [5, 6], "gather": "rank0", "result": res.format(job="two")},  # 1 + 1 + 0
            {"seeds": [5, 6], "batch_size": 1, "result": res.format(job="two-all")}]
    results, _ = launch(3, {"steps": STEPS, "jobs": jobs})
    assert [rc for rc, _ in results] == [0, 0, 0], results
    ref7, ref2 = reference(SEEDS7, torch.linspace(-1, 1, 7)), reference([5, 6])
    for r in range(3):
        assert torch.equal(torch.load(res.format(job="seven").format(rank=r)), ref7)
        assert torch.equal(torch.load(res.format(job="two-all").format(rank=r)), ref2)
    assert torch.equal(torch.load(res.format(job="two").format(rank=0)), ref2)
    assert not any(os.path.exists(res.format(job="two").format(rank=r)) for r in (1, 2))  # None there


@pytest.fixture(scope="module")
def single_process_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    D.sample(make_model(), SHAPE, seeds=SEEDS7, out_dir=d, plan=edm_euler_ancestral(STEPS), backend="reference",
             model_id=MODEL_ID)
    return files_of(d)


@pytest.mark.parametrize("how,world,bad,resume_world", [("raise", 2, 1, 1), ("kill", 3, 2, 2), ("kill", 2, 0, 1)])
def test_failed_rank_is_named_on_every_rank_and_resume_completes_identically(
        tmp_path, single_process_files, how, world, bad, resume_world):
    d = str(tmp_path / "out")
    cfg = {"seeds": SEEDS7, "steps": STEPS, "out_dir": d, "batch_size": 1, "timeout": 30,
           "fail": {"rank": bad, "call": STEPS + 1, "how": how}}  # fails inside its second sample
    results, wall = launch(world, cfg)
    assert wall < 30, f"ranks took {wall:.1f}s to stop after rank {bad} failed"
    for r, (rc, err) in enumerate(results):
        if how == "kill" and r == bad:
            assert rc == -9
            continue
        assert rc == 1, f"rank {r} exited {rc}: {err[-2000:]}"
        if how == "raise":
            want = f"rank {bad} failed during chunk 1; every rank stops. rank {bad}: ValueError: injected failure"
        else:  # rank 0 hosts the store (no torchrun agent here): its death is inferred from that
            want = f"rank {bad} stopped responding during chunk 1"
        assert_one_error_line(err, "RankFailedError: " + want)
    written = files_of(d)
    assert 0 < len(written) < 7
    for name, data in written.items():  # what was written is complete and exactly right
        assert data == single_process_files[name]
    # the layout does not depend on the world size: resume with another one
    if resume_world == 1:
        D.sample(make_model(), SHAPE, seeds=SEEDS7, out_dir=d, resume=True, plan=edm_euler_ancestral(STEPS),
                 backend="reference", model_id=MODEL_ID)
    else:
        results, _ = launch(resume_world, {**cfg, "resume": True, "fail": {}})
        assert [rc for rc, _ in results] == [0] * resume_world, results
    assert files_of(d) == single_process_files


def test_hung_rank_times_out_and_is_named():
    cfg = {"seeds": SEEDS7, "steps": STEPS, "batch_size": 1, "timeout": 3,
           "fail": {"rank": 1, "call": 1, "how": "hang"}}
    results, wall = launch(2, cfg, hung={1})
    assert results[1][0] is None  # the hung rank was still hanging; the test killed it
    rc, err = results[0]
    assert rc == 1, err[-2000:]
    assert_one_error_line(err, "rank 1 stopped responding during chunk 0 (died, or hung past timeout=3s;")
    assert wall < 30


def stop_mark(tmp_path) -> tuple[dict, str]:
    mark = str(tmp_path / "stopped-at")
    return {"DIST_WORKER_MARK": mark}, mark


def assert_survivors_exit_in_time(results, exits, bad: int, mark: str, timeout: float) -> None:
    """Every rank but ``bad`` exited with status 1 within ``timeout`` + EXIT_MARGIN_S of ``bad``'s stop."""
    assert results[bad][0] is None, f"rank {bad} was to stay stopped, it exited {results[bad][0]}"
    stopped_at = float(open(mark).read())
    for r, (rc, err) in enumerate(results):
        if r == bad:
            continue
        assert rc == 1, f"rank {r} exited {rc} (not 1 by itself: a signal or an abort): {err[-2000:]}"
        took = exits[r] - stopped_at
        assert took < timeout + EXIT_MARGIN_S, f"rank {r} exited {took:.1f}s after rank {bad} stopped"


@pytest.mark.parametrize("world,bad", [(2, 1), (3, 2), (2, 0)])
def test_stopped_rank_is_named_and_every_survivor_exits_with_status_1(tmp_path, world, bad):
    # A real SIGSTOP (every thread of the rank stops and its sockets stay open, as on a hung host).
    # Rank 0 hosts the store: its survivors find the store unresponsive and name rank 0.
    # Used to end in SIGABRT ("terminate called without an active exception") at the survivor's exit:
    # gloo's worker thread ended the timed-out collective during interpreter shutdown.
    env, mark = stop_mark(tmp_path)
    cfg = {"seeds": SEEDS7, "steps": STEPS, "batch_size": 1, "timeout": 3,
           "fail": {"rank": bad, "call": STEPS + 1, "how": "stop"}}
    argv = [sys.executable, "-m", "tests.distributed._dist_worker", json.dumps(cfg)]
    results, _, exits = run_ranks(world, argv, hung={bad}, env=env)
    assert_survivors_exit_in_time(results, exits, bad, mark, 3)
    want = (f"rank {bad} stopped responding during chunk 1 (died, or hung past timeout=3s;" if bad != 0 else
            "rank 0 stopped responding during chunk 1 (died or hung: the store it hosts is unreachable)")
    for r, (_, err) in enumerate(results):
        if r != bad:
            assert_one_error_line(err, f"RankFailedError: {want}")
            assert f"this is rank {r}." in err


def test_library_after_a_failure_leaves_no_gloo_thread_and_can_sample_alone(tmp_path):
    # After RankFailedError, the failed group's worker threads are joined (nothing of it runs at
    # the interpreter's exit) and the process can go on: a world-of-one call still works.
    env, mark = stop_mark(tmp_path)
    script = (
        "import json, os, sys, threading, torch\n"
        "from fastdiff import distributed as D\n"
        "from tests.distributed._dist_worker import make_model, SHAPE\n"
        "from tests._plans import edm_euler_ancestral\n"
        "ok, stops = make_model(), make_model(SHAPE, 1, 1, 'stop')\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "kw = dict(plan=edm_euler_ancestral(2), backend='reference')\n"
        "D.sample(ok, SHAPE, seeds=[1, 2], timeout=3, **kw)  # a successful call: the groups are set up\n"
        "before = threads()\n"
        "try:\n"
        "    D.sample(stops, SHAPE, seeds=[1, 2], timeout=3, batch_size=1, **kw)\n"
        "except D.RankFailedError as exc:\n"
        "    print(f'RankFailedError: {exc}', file=sys.stderr)\n"
        "after = threads()\n"
        "assert after <= before, (before, after)\n"
        "os.environ['WORLD_SIZE'] = '1'\n"
        "torch.distributed.destroy_process_group()\n"
        "out = D.sample(ok, SHAPE, seeds=[1, 2], **kw)\n"
        "assert out.shape == (2, *SHAPE)\n"
        "sys.exit(1)\n")
    results, _, exits = run_ranks(2, [sys.executable, "-c", script], hung={1}, env=env)
    assert_survivors_exit_in_time(results, exits, 1, mark, 3)
    assert_one_error_line(results[0][1], "RankFailedError: rank 1 stopped responding during chunk 0")


# --- the command line ---------------------------------------------------------------------------

CLI = ["sample", "--model", "gmm", "--sampler", "euler_ancestral", "--steps", "6", "--shape", "2", "--num", "20",
       "--seed", "3", "--batch-size", "4", "--backend", "reference"]


def test_cli_single_process_resume_and_manifest(tmp_path, capsys):
    d = str(tmp_path / "cli")
    assert cli_main(CLI + ["--out", d]) == 0
    assert "20 samples of shape (2,)" in capsys.readouterr().out
    files = files_of(d)
    assert len(files) == 21 and "fastdiff-sample.json" in files
    for name in list(files)[3:9]:
        os.remove(os.path.join(d, name))
    assert cli_main(CLI + ["--out", d]) == 2  # existing files without --resume
    assert "pass resume=True" in capsys.readouterr().err
    assert cli_main(CLI + ["--out", d, "--resume"]) == 0
    assert files_of(d) == files
    assert cli_main(CLI[:6] + ["7"] + CLI[7:] + ["--out", d, "--resume"]) == 2
    assert "holds samples of a run with other settings (--steps was 6, now 7)" in capsys.readouterr().err
    assert cli_main(["sample", "--model", "nope", "--out", str(tmp_path / "x")]) == 2
    from fastdiff.cli import SAMPLE_MODELS

    assert f"--model must be one of {sorted(SAMPLE_MODELS)} or module:attr, got 'nope'" in capsys.readouterr().err


def test_cli_model_from_module_attr(tmp_path):
    d = str(tmp_path / "m")
    args = ["sample", "--model", "tests.distributed._dist_worker:model", "--sampler", "euler_ancestral", "--steps", "3",
            "--shape", "3,4", "-n", "3", "--out", d, "--backend", "reference"]
    assert cli_main(args) == 0
    assert len(os.listdir(d)) == 4


def test_cli_under_torchrun_matches_single_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert cli_main(CLI + ["--out", one]) == 0
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    # -n, not --num: on Python < 3.12 torchrun's own parser rejects --num as an abbreviation of its
    # --numa-binding (so does any option after the script); `torchrun ... -m -- fastdiff ...` also works.
    args = ["-n" if a == "--num" else a for a in CLI]
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "--monitor-interval=0.1", "-m", "fastdiff"] + args + ["--out", two]
    env = {k: v for k, v in rank_env(0, 1, 0).items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                     "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "20 samples of shape (2,) in" in p.stdout and "2 processes" in p.stdout
    assert files_of(two) == files_of(one)



CLI_FAIL = ["sample", "--model", "tests.distributed._dist_worker:make_env_model", "--sampler", "euler_ancestral", "--steps", "3",
            "--shape", "3,4", "-n", "6", "--batch-size", "1", "--backend", "reference", "--timeout", "3"]
# The command line probes the model once (call 0); then 3 calls per sample: call 5 is in chunk 1.


@pytest.mark.parametrize("how,bad", [("stop", 1), ("stop", 0), ("raise", 1)])
def test_cli_failed_rank_gives_one_error_line_and_status_1_on_every_survivor(tmp_path, how, bad):
    env, mark = stop_mark(tmp_path)
    env["DIST_WORKER_FAIL"] = f"{bad},5,{how}"
    argv = [sys.executable, "-m", "fastdiff"] + CLI_FAIL + ["--out", str(tmp_path / "out")]
    results, _, exits = run_ranks(2, argv, hung={bad} if how == "stop" else set(), env=env)
    if how == "stop":
        assert_survivors_exit_in_time(results, exits, bad, mark, 3)
        want = ("fastdiff sample: error: rank 1 stopped responding during chunk 1 (died, or hung past timeout=3s;"
                if bad == 1 else "fastdiff sample: error: rank 0 stopped responding during chunk 1 (died or hung:")
        assert_one_error_line(results[1 - bad][1], want)
    else:  # the raising rank stops too: both exit 1 with the same line
        for rc, err in results:
            assert rc == 1, err[-2000:]
            assert_one_error_line(err, f"fastdiff sample: error: rank {bad} failed during chunk 1; every rank stops. "
                                       f"rank {bad}: ValueError: injected failure at model call 5")
