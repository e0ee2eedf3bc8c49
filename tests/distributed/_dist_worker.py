"""One rank of a distributed test run (``python -m tests.distributed._dist_worker CONFIG_JSON``), and its model.

The rank, world size and rendezvous come from the environment, as torchrun sets them. The config
says what to sample (one call, or several ``jobs`` in turn, to start fewer processes) and,
optionally, on which rank and model call to fail (raise, SIGKILL, SIGSTOP or hang). Like a user's
script, it reports a :class:`~fastdiff.distributed.RankFailedError` in one line on stderr and exits
with status 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

from fastdiff import distributed
from fastdiff.models import GaussianMixture

from .._plans import edm_euler_ancestral

SHAPE = (3, 4)


def make_model(shape=SHAPE, fail_rank: int = -1, fail_call: int = -1, how: str = "raise"):
    """An x0-model on Karras sigmas whose output for a sample does not depend on its batch.

    The exact Gaussian-mixture denoiser is evaluated one sample at a time on a fresh copy: its
    float64 matmuls round differently with the batch size and even with the row's memory
    alignment, which would break bit-identity for reasons that have nothing to do with sharding.
    A per-sample condition ``c`` adds ``0.1 * c`` to the output. On rank ``fail_rank``, model call
    number ``fail_call`` (counting from 0) raises, SIGKILLs the process, SIGSTOPs it (every thread
    stops, its connections stay open: a hung host; it first writes ``time.monotonic()`` to the file
    ``DIST_WORKER_MARK`` names, if set) or sleeps for 10 minutes (``how``: ``"raise"``, ``"kill"``,
    ``"stop"``, ``"hang"``).
    """
    gm = GaussianMixture.default(shape, components=4)
    exact = gm.model(lambda t: (torch.ones_like(t), t), "x0")
    calls = [0]
    rank = int(os.environ.get("RANK", "0"))

    def model(x, t, cond=None):
        if rank == fail_rank and calls[0] == fail_call:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "stop":
                if os.environ.get("DIST_WORKER_MARK"):  # when it stopped, for the tests' time bound
                    with open(os.environ["DIST_WORKER_MARK"], "w") as f:
                        f.write(repr(time.monotonic()))
                os.kill(os.getpid(), signal.SIGSTOP)
            if how == "hang":
                time.sleep(600)
            raise ValueError(f"injected failure at model call {fail_call}\n(a second line: reports show the first)")
        calls[0] += 1
        out = torch.cat([exact(x[i:i + 1].clone(), t[i:i + 1].clone()) for i in range(x.shape[0])])
        if cond is not None:
            out = out + 0.1 * cond.to(out.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        return out

    return model


def model(x, t, cond=None):
    """The test model as a plain callable (for ``fastdiff sample --model tests.distributed._dist_worker:model``)."""
    return _default(x, t, cond)


_default = make_model()


def make_env_model():
    """``fastdiff sample --model tests.distributed._dist_worker:make_env_model``: the test model for ``--shape``
    3,4, failing as ``DIST_WORKER_FAIL`` says (``"RANK,CALL,HOW"``, see :func:`make_model`; the
    command line's own probe of the model is call 0)."""
    spec = os.environ.get("DIST_WORKER_FAIL", "")
    if not spec:
        return make_model()
    rank, call, how = spec.split(",")
    return make_model(SHAPE, int(rank), int(call), how)
MODEL_ID = "tests.distributed._dist_worker: exact 4-component Gaussian mixture, x0 on Karras sigmas"
"""The model's name in resume manifests: the failure knobs in its closure do not change its samples."""


def run(cfg: dict) -> None:
    """One :func:`fastdiff.distributed.sample` call as ``cfg`` says; saves the result to ``cfg["result"]``."""
    seeds = cfg["seeds"]
    shape = tuple(cfg.get("shape", SHAPE))
    f = cfg.get("fail", {})
    m = make_model(shape, f.get("rank", -1), f.get("call", -1), f.get("how", "raise"))
    conds = torch.linspace(-1, 1, len(seeds)) if cfg.get("conds") else None
    out = distributed.sample(
        m, shape, seeds=seeds, conds=conds, out_dir=cfg.get("out_dir"), resume=cfg.get("resume", False),
        batch_size=cfg.get("batch_size"), gather=cfg.get("gather", "all"), timeout=cfg.get("timeout", 30.0),
        plan=edm_euler_ancestral(cfg.get("steps", 4)), backend="reference", model_id=MODEL_ID,
    )
    if cfg.get("result") and isinstance(out, torch.Tensor):
        torch.save(out, cfg["result"].format(rank=int(os.environ.get("RANK", "0"))))


def main(cfg: dict) -> int:
    """Run ``cfg``, or each of ``cfg["jobs"]`` (merged over ``cfg``) in turn, in one process.

    Returns the exit status: 0, or 1 after printing a ``RankFailedError`` as one line.
    """
    try:
        for job in cfg.pop("jobs", [{}]):
            run({**cfg, **job})
    except distributed.RankFailedError as exc:
        print(f"RankFailedError: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
