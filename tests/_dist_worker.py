"""One rank of a distributed test run (``python -m tests._dist_worker CONFIG_JSON``), and its model.

The rank, world size and rendezvous come from the environment, as torchrun sets them. The config
says what to sample (one call, or several ``jobs`` in turn, to start fewer processes) and,
optionally, on which rank and model call to fail (raise, SIGKILL or hang).
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

from ._plans import edm_euler_ancestral

SHAPE = (3, 4)


def make_model(shape=SHAPE, fail_rank: int = -1, fail_call: int = -1, how: str = "raise"):
    """An x0-model on Karras sigmas whose output for a sample does not depend on its batch.

    The exact Gaussian-mixture denoiser is evaluated one sample at a time on a fresh copy: its
    float64 matmuls round differently with the batch size and even with the row's memory
    alignment, which would break bit-identity for reasons that have nothing to do with sharding.
    A per-sample condition ``c`` adds ``0.1 * c`` to the output. On rank ``fail_rank``, model call
    number ``fail_call`` (counting from 0) raises, SIGKILLs the process or hangs (``how``).
    """
    gm = GaussianMixture.default(shape, components=4)
    exact = gm.model(lambda t: (torch.ones_like(t), t), "x0")
    calls = [0]
    rank = int(os.environ.get("RANK", "0"))

    def model(x, t, cond=None):
        if rank == fail_rank and calls[0] == fail_call:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                time.sleep(600)
            raise ValueError(f"injected failure at model call {fail_call}")
        calls[0] += 1
        out = torch.cat([exact(x[i:i + 1].clone(), t[i:i + 1].clone()) for i in range(x.shape[0])])
        if cond is not None:
            out = out + 0.1 * cond.to(out.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        return out

    return model


def model(x, t, cond=None):
    """The test model as a plain callable (for ``fastdiff sample --model tests._dist_worker:model``)."""
    return _default(x, t, cond)


_default = make_model()
MODEL_ID = "tests._dist_worker: exact 4-component Gaussian mixture, x0 on Karras sigmas"
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


def main(cfg: dict) -> None:
    """Run ``cfg``, or each of ``cfg["jobs"]`` (merged over ``cfg``) in turn, in one process."""
    for job in cfg.pop("jobs", [{}]):
        run({**cfg, **job})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
