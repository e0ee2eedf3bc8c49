"""Sampling one global batch across processes and machines with ``torch.distributed``.

Launch the same script on every rank (``torchrun --nproc_per_node=K script.py``) and call
:func:`sample` with the GLOBAL list of seeds. Each rank samples its share with
:func:`fastdiff.sample` and the results are either gathered or written, one file per sample, to a
folder. Without ``torch.distributed`` initialised and without ``WORLD_SIZE > 1`` in the environment,
the process is a world of size 1 and no collective is used.

Sharding: rank ``r`` of ``W`` takes the CONTIGUOUS block of global indices
``[r*q + min(r, m), (r+1)*q + min(r+1, m))`` with ``q, m = divmod(N, W)``: the first ``m`` ranks
take one sample more. Ranks with nothing to do (``W > N``) still take part in every collective.

Noise: the initial noise of sample ``i`` is Philox keyed by ``seeds[i]`` at the reserved row
:data:`INIT_ROW` (``2**32 - 1``, which no plan row reaches), stream 0, and the solver noise is
fastdiff's in-kernel Philox keyed by the same seed. Nothing depends on the rank, the position in a
batch or the batch size, so the gathered result is BIT-IDENTICAL to one process sampling the whole
batch -- provided the model's output for one sample does not depend on the rest of its batch.
That holds for element-wise and per-sample models, but not in general: BLAS picks different
kernels (and summation orders) for different batch sizes, and even a different memory alignment
of the same row can change the last bit in float64. Such models agree to rounding, not bit for bit.

Failure propagation: after the set-up and after every chunk, every rank takes part in one
``all_reduce`` of a per-rank failure flag on a gloo group of its own (op timeout ``timeout``). A
rank whose chunk raised sets its flag and still joins, so every rank sees the flags, exchanges the
error messages (``all_gather_object``) and raises :class:`RankFailedError` naming the rank, at the
same boundary. A rank that died (killed, segfault) closes its connections, so the collective fails
at once on the others; a rank that hangs (deadlock, SIGSTOP, a frozen host: its connections stay
open) makes it time out. For these, every rank posts an "arrived" mark to the process group's
store before the collective; after a failure the survivors wait for slower ranks' marks (twice
this rank's longest stage plus :data:`LOST_GRACE_S`, at most ``timeout``) and name the ranks still
missing (a rank slower than that is named too, with wording that says so). If the store is
unreachable -- its host died, or does not answer within :data:`STORE_REPLY_S` (at most
``timeout``): it is stopped -- that host is the failed one: rank 0 when launched without
torchrun's agent (then rank 0 is named), else the agent (then the rank is unknown). So every
survivor raises within about ``timeout`` (plus the store's reply limit when rank 0 hosts the
store and hung) of the failure. Files already written stay complete: each is written to a
temporary file in ``out_dir`` and renamed.

Before :class:`RankFailedError` is raised, the failed collective is wound up: the rank waits (at
most ``timeout`` + :data:`RETIRE_MARGIN_S`; gloo ends a timed-out operation within milliseconds
of the wait) until gloo has finished with it, then destroys the gloo group, which joins its worker
threads. Nothing of the failed group runs afterwards, so the process can go on, or exit with
whatever status the caller chooses (``fastdiff sample`` exits 1 after one ``error:`` line).
Without this, gloo's worker thread dropped the collective's tensors while the interpreter was
exiting and the process died by SIGABRT ("terminate called without an active exception"), see
:meth:`_Group.retire`. Only if gloo never finishes the operation is the group leaked instead.
While naming the failed ranks, torch's multi-line warnings about failed store reads are kept off
stderr (everything else written there is passed on).

Process groups: if ``torch.distributed`` is not initialised and ``WORLD_SIZE > 1``, the first
:func:`sample` call initialises the default process group from the environment and keeps it for
later calls of this process (a group the caller initialised is used as it is, never destroyed);
it is destroyed at exit after success, and left to the process's end after a failure. Each call
makes and destroys its own gloo group for the failure flags. Outside the protocol: a rank that
fails before its first collective (joining the default group, where every rank must arrive within
``max(timeout, 300)`` seconds, or making the flags' group) leaves the others waiting for that join
timeout. Argument errors are raised before it, alike on every rank (the arguments are the same);
a host-dependent one (``device`` names CUDA on a host without it) is such an early failure.
``out_dir`` is checked by every rank in the set-up stage, so a folder one host cannot write is
reported like any other failure.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import api
from . import manifest
from ..runtime import ops
from ..core import validate
from ..core.rng import _signed64, randn

LOST_GRACE_S = 2.0
"""After a collective fails, a rank waits this long plus twice its longest stage so far (from the
last check to its arrival), at most ``timeout``, from its own arrival, for slower ranks' marks."""
INIT_ROW = 2**32 - 1
"""Philox row (counter word 2) of the initial noise; plan rows count up from 0 and never reach it."""
RETIRE_MARGIN_S = 5.0
"""After a failed collective, how long past ``timeout`` a rank waits for gloo to end the operation
(its op timeout is ``timeout`` as well, so it ends within milliseconds) before it leaks the group
instead of destroying it (see :meth:`_Group.retire`)."""
STORE_REPLY_S = 10.0
"""Longest wait (at most ``timeout``) for one reply of the store, on the protocol's own connection
to it, before the store counts as unreachable: a live store answers in milliseconds, a stopped
host never (see :class:`_StoreLine`)."""
MAX_TIMEOUT_S = 1e9
"""Largest ``timeout`` (seconds, about 31 years): longer ones overflow ``datetime.timedelta``."""

_FORBIDDEN = {
    "seed": "give the global list as seeds=",
    "generator": "torch.Generator noise is not keyed per sample; distributed sampling uses Philox seeds",
    "cond": "give the global per-sample conditions as conds=",
    "uncond": "give the global per-sample unconditional conditions as unconds=",
}
_calls = [0]  # per-process call counter: every rank calls in the same order, so keys agree
_OWNED: dict[str, Any] = {"group": None, "atexit": False, "failed": False}
"""The default process group :func:`sample` created (``group``), kept for later calls and
destroyed at exit after success (``failed``: a call of this process failed, then it is left to the
process's end). Never torn down and re-made between calls: the next rendezvous on the same
``MASTER_PORT`` could reach the previous store, still served by a slower rank 0 (every other rank
then joins the stale store and rank 0 waits for them until the join timeout), and torchrun's
agent store keeps the previous group's keys (a new group of the same name reads stale addresses)."""
_LEAKED: list = []


def _leak(objs) -> None:
    """Keep ``objs`` alive for the rest of the process, finalisation included (see :meth:`_Group.retire`)."""
    _LEAKED.append(objs)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(objs))  # the list may be cleared at exit; this reference stays


def _default_group():
    try:
        return dist.distributed_c10d._get_default_group()
    except Exception:  # noqa: BLE001 - not initialised
        return None


def _destroy_owned() -> None:
    """At exit: destroy the default group :func:`sample` created, unless a call failed (a hung peer
    could block NCCL's teardown; gloo's needs nothing then)."""
    group, _OWNED["group"] = _OWNED["group"], None
    if group is None or _OWNED["failed"] or not dist.is_initialized() or _default_group() is not group:
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def _env_world() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset), or a ``ValueError`` naming it."""
    text = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        world = int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int >= 1, got {text!r}") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be an int >= 1, got {text!r}")
    return world


class RankFailedError(RuntimeError):
    """A rank failed (raised, died or stopped responding) during :func:`sample`.

    Attributes:
        ranks: the global ranks that failed.
        stage: where it was noticed: ``"setup"``, ``"chunk K"`` or ``"gather"``.
    """

    def __init__(self, message: str, ranks: Sequence[int], stage: str):
        super().__init__(message)
        self.ranks = list(ranks)
        self.stage = stage


def shard(n: int, rank: int, world: int) -> range:
    """The global indices rank ``rank`` of ``world`` samples out of ``n``: a contiguous block.

    The first ``n % world`` ranks take one more; ranks past ``n`` get an empty range.
    """
    for name, v, lo in (("n", n, 0), ("world", world, 1), ("rank", rank, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world:
        raise ValueError(f"rank must be < world ({world}), got {rank}")
    q, m = divmod(n, world)
    start = rank * q + min(rank, m)
    return range(start, start + q + (1 if rank < m else 0))


def initial_noise(shape: Sequence[int], seeds: Sequence[int], *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The initial noise :func:`sample` uses: ``[len(seeds), *shape]``, sample ``i`` keyed by ``seeds[i]``.

    Pass it to :func:`fastdiff.sample` with ``seed=seeds`` to reproduce a distributed run in one process.
    """
    return randn((len(seeds), *shape), list(seeds), row=INIT_ROW, stream=0, device=device, dtype=dtype)


def sample_path(out_dir: str | os.PathLike, index: int, seed: int, n: int) -> str:
    """The file of global sample ``index`` (of ``n``) with ``seed``: ``{out_dir}/{index:06d}-seed{seed}.pt``.

    The seed is written as an unsigned 64-bit number; the index is zero-padded to at least 6 digits.
    """
    width = max(6, len(str(n - 1)))
    return os.path.join(os.fspath(out_dir), f"{index:0{width}d}-seed{seed & 0xFFFFFFFFFFFFFFFF}.pt")


def load_sample(path: str | os.PathLike) -> dict:
    """Read one per-sample file: ``{"sample": tensor (CPU), "index": int, "seed": int}``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def sample(
    model: Callable,
    noise: Sequence[int] | torch.Tensor,
    *,
    seeds: Sequence[int] | torch.Tensor,
    conds: torch.Tensor | Mapping | Sequence | None = None,
    unconds: torch.Tensor | Mapping | Sequence | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    batch_size: int | None = None,
    gather: str = "all",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    timeout: float = 1800.0,
    model_id: str | None = None,
    record: Mapping[str, Any] | None = None,
    **sample_kwargs: Any,
) -> torch.Tensor | list[str] | None:
    """Sample a global batch across all ranks; the result equals one process sampling it all.

    Call it on every rank with the same arguments (see the module docstring for the sharding,
    noise and failure protocol). If ``torch.distributed`` is not initialised and ``WORLD_SIZE > 1``
    (as under ``torchrun``), the default process group is created from the environment (``nccl``
    for CUDA devices, else ``gloo``; joining waits up to ``max(timeout, 300)`` seconds for every
    rank), kept for later calls and destroyed at exit (see the module docstring). Every argument
    is checked before any work; ``out_dir`` is checked and created in the set-up stage, before any
    file is written.

    Args:
        model: the model, as for :func:`fastdiff.sample` (the same weights on every rank).
        noise: the shape of ONE sample (e.g. ``(4, 64, 64)``): initial noise is
            :func:`initial_noise` keyed by each sample's seed; or an ``[N, ...]`` tensor of global
            initial noise, identical on every rank, of which each rank takes its rows.
        seeds: ``N`` 64-bit seeds, one per sample, the same list on every rank.
        conds, unconds: optional per-sample conditioning for the whole batch: an ``[N, ...]``
            tensor; a dict (string keys: the model's keyword arguments; nested dicts allowed)
            whose tensors are ``[N, ...]`` and are split by sample, while other values (numbers,
            strings, ...) reach every chunk as they are -- lists and tuples are refused, being
            ambiguous; or a sequence of ``N`` per-sample tensors, or dicts, of ONE structure
            (tensors of one shape, dtype and device at each place, other values equal), stacked.
            Python numbers or lists as entries are refused: give tensors.
        out_dir: if given (a ``str`` or ``os.PathLike`` path), every sample is written, as soon as
            its chunk is done, to :func:`sample_path` (``torch.save`` of a dict, written to a
            temporary file in ``out_dir`` and renamed, so a file is complete or absent). It is
            created if needed; a file in its place, a folder that cannot be created (its parent
            is a file or not writable) or written to is a ``ValueError`` naming it.
        resume: with ``out_dir``: skip samples whose file exists and holds this sample (it is loaded
            and its index, seed, shape and dtype checked; a file that cannot be loaded is sampled
            again, with a warning; one that holds another sample is an error). Without it, existing
            sample files are an error. Either way the folder's manifest (:mod:`fastdiff.distributed.manifest`,
            written before the first sample) must record the same settings as this call whenever the
            folder holds sample files: a :class:`fastdiff.distributed.manifest.ManifestError` names each setting
            that differs.
        batch_size: most samples per :func:`fastdiff.sample` call on one rank (default: the rank's
            whole share). Failures are checked and files written after each such chunk.
        gather: without ``out_dir``: ``"all"`` returns ``[N, ...]`` on every rank, ``"rank0"`` on
            rank 0 only (``None`` elsewhere), ``"none"`` returns each rank's own share.
        dtype: storage dtype of the state when ``noise`` is a shape (a floating ``torch.dtype``).
        device: where to sample, a ``torch.device`` or string this host can use (default:
            ``noise``'s device, else ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
        timeout: seconds a rank waits for the others at a chunk boundary or gather before it
            gives up and names the ranks that did not arrive: a finite number > 0, at most
            :data:`MAX_TIMEOUT_S`. Must exceed the longest chunk.
        model_id: with ``out_dir``: names the model and its weights in the manifest (e.g.
            ``"sd15 ema, weights sha256 ..."``); default: the SHA-256 of an ``nn.Module``'s state dict
            (computed once per call), or a function's name and the modules, tensors and numbers it
            closes over.
        record: with ``out_dir``: more settings to record in the manifest and compare on resume
            (a JSON-like mapping; the command line records its flags here).
        **sample_kwargs: every other argument of :func:`fastdiff.sample` (``sampler``, ``steps``,
            ``schedule``, ``guidance_scale``, ``plan``, ``backend``, ...); not ``seed``,
            ``generator``, ``cond`` or ``uncond``.

    Returns:
        Without ``out_dir``: the samples, ``[N, ...]`` in global order, typed like the noise, on
        ``device`` (or as ``gather`` says). With ``out_dir``: the ``N`` file paths in global order,
        every one of which exists when this returns.

    Raises:
        TypeError, ValueError: a bad argument, named (before any work; ``out_dir``'s folder
            before any file is written). With world size > 1, an ``out_dir`` this rank cannot
            create or write fails the set-up stage: :class:`RankFailedError` on every rank.
        RankFailedError: on every rank, naming the failed ranks, when any rank raised, died,
            hung or timed out (world size > 1). Every collective of the failed call has been wound
            up by then (see the module docstring): the caller may go on or exit, with any status.
            With world size 1 the original exception propagates.
    """
    seeds = _check_seeds(seeds)
    n = len(seeds)
    for k, why in _FORBIDDEN.items():
        if k in sample_kwargs:
            raise TypeError(f"distributed.sample does not take {k}=: {why}")
    if gather not in ("all", "rank0", "none"):
        raise ValueError(f"gather must be 'all', 'rank0' or 'none', got {gather!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__} {timeout!r}")
    if not math.isfinite(timeout):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if timeout > MAX_TIMEOUT_S:
        raise ValueError(f"timeout must be at most {MAX_TIMEOUT_S:g} seconds, got {timeout!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the folder of per-sample files to resume)")
    if out_dir is not None:
        _check_out_dir_arg(out_dir)
    if model_id is not None and (not isinstance(model_id, str) or not model_id):
        raise TypeError(f"model_id must be a non-empty string naming the model and its weights, got {model_id!r}")
    if record is not None and not isinstance(record, Mapping):
        raise TypeError(f"record must be a mapping of settings to record in the manifest, got {type(record).__name__}")
    if isinstance(noise, torch.Tensor):
        if noise.dim() < 1 or noise.shape[0] != n:
            raise ValueError(f"noise tensor must be [N, ...] with N = len(seeds) = {n}, got shape {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must have a floating dtype, got {noise.dtype}")
        if noise.is_meta:
            raise ValueError("noise is a meta tensor (shape only, no data)")
        if 0 in noise.shape[1:]:
            raise ValueError(f"noise tensor must be [N, ...] with no zero-sized sample dimension, "
                             f"got shape {tuple(noise.shape)}")
        shape, dtype = tuple(noise.shape[1:]), noise.dtype
        device = _check_device(device) if device is not None else noise.device
    else:
        shape = _check_shape(noise)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, ...), got {dtype!r}")
        device = _check_device(device) if device is not None else _default_device()
    _check_batch("conds", conds, n)
    _check_batch("unconds", unconds, n)

    grp = _Group.create(device, timeout)
    result = _run(grp, model, noise, shape, dtype, device, seeds, conds, unconds, out_dir, resume, batch_size,
                  gather, sample_kwargs, model_id, record)
    grp.close()  # success; after a failure the flags' group was wound up before RankFailedError (retire)
    return result


def _run(grp, model, noise, shape, dtype, device, seeds, conds, unconds, out_dir, resume, batch_size, gather,
         kwargs, model_id=None, record=None):
    n = len(seeds)
    mine = shard(n, grp.rank, grp.world)
    bs = batch_size or max(len(shard(n, 0, grp.world)), 1)
    n_chunks = -(-len(shard(n, 0, grp.world)) // bs)  # rank 0 has the largest share

    todo = set(mine)
    with grp.stage("setup"):
        if out_dir is not None:
            _make_out_dir(out_dir)  # named errors, before anything is written
            doc = manifest.build(seeds=seeds, shape=shape, dtype=dtype, device=device,
                                 noise=noise if isinstance(noise, torch.Tensor) else None, model=model,
                                 model_id=model_id, conds=conds, unconds=unconds, settings=kwargs, run=record,
                                 backend=ops.backend_for(kwargs.get("backend", "auto"),
                                                         torch.empty((1, *shape), dtype=dtype, device=device)))
            manifest.check(out_dir, doc, write=grp.rank == 0)
            todo = set(_prepare_dir(out_dir, mine, seeds, n, resume, shape, dtype))
    local = []
    for c in range(n_chunks):
        with grp.stage(f"chunk {c}"):
            idx = [i for i in mine[c * bs:(c + 1) * bs] if i in todo]
            if idx:
                x = _sample_chunk(model, noise, shape, dtype, device, seeds, conds, unconds, idx, kwargs)
                if out_dir is not None:
                    for j, i in enumerate(idx):
                        _write_atomic(sample_path(out_dir, i, seeds[i], n),
                                      {"sample": x[j].detach().to("cpu").clone(), "index": i,
                                       "seed": seeds[i] & 0xFFFFFFFFFFFFFFFF})
                else:
                    local.append(x)
    if out_dir is not None:
        return [sample_path(out_dir, i, seeds[i], n) for i in range(n)]
    mine_x = torch.cat(local) if local else torch.empty((0, *shape), dtype=dtype, device=device)
    if gather == "none" or grp.world == 1:
        return mine_x
    return grp.gather(mine_x, n, gather == "rank0")


def _sample_chunk(model, noise, shape, dtype, device, seeds, conds, unconds, idx, kwargs) -> torch.Tensor:
    s = [seeds[i] for i in idx]
    if isinstance(noise, torch.Tensor):
        x0 = noise[torch.tensor(idx, device=noise.device)].to(device)
    else:
        x0 = initial_noise(shape, s, dtype=dtype, device=device)
    return api.sample(model, x0, seed=s, cond=_select(conds, idx, device), uncond=_select(unconds, idx, device),
                      **kwargs)


def _select(c, idx: list[int], device):
    """The rows ``idx`` of conditioning ``c`` (checked by :func:`_check_batch`), on ``device``."""
    if c is None:
        return None
    if isinstance(c, torch.Tensor):
        return c[torch.tensor(idx, device=c.device)].to(device)
    if isinstance(c, Mapping):
        return {k: _select(v, idx, device) if isinstance(v, (torch.Tensor, Mapping)) else v for k, v in c.items()}
    return _stack([c[i] for i in idx], device)


def _stack(items: list, device):
    """Per-sample tensors or dicts of one structure, stacked place by place (other values: the first's)."""
    first = items[0]
    if isinstance(first, Mapping):
        return {k: _stack([it[k] for it in items], device) if isinstance(first[k], (torch.Tensor, Mapping))
                else first[k] for k in first}
    return torch.stack(items).to(device)


def _prepare_dir(out_dir, mine: range, seeds: list[int], n: int, resume: bool, shape: tuple[int, ...],
                 dtype: torch.dtype) -> list[int]:
    """Drop this rank's stale temporary files, verify its existing sample files, return the indices
    still to do (see ``resume`` in :func:`sample`)."""
    names = {os.path.basename(sample_path(out_dir, i, seeds[i], n)) for i in mine}
    for entry in os.listdir(out_dir):
        if entry.startswith(".") and entry.endswith(".tmp") and entry[1:].split(".pt.", 1)[0] + ".pt" in names:
            os.remove(os.path.join(out_dir, entry))
    done = [i for i in mine if os.path.exists(sample_path(out_dir, i, seeds[i], n))]
    if done and not resume:
        raise FileExistsError(f"out_dir {os.fspath(out_dir)!r} already holds {len(done)} of this rank's sample "
                              f"files (e.g. {os.path.basename(sample_path(out_dir, done[0], seeds[done[0]], n))}); "
                              f"pass resume=True (--resume) to keep them and sample only the missing ones")
    skip = set()
    for i in done:
        path = sample_path(out_dir, i, seeds[i], n)
        try:
            got = load_sample(path)
        except Exception as exc:  # noqa: BLE001 - empty, truncated or corrupt: not a sample, sample it again
            warnings.warn(f"{path} cannot be loaded ({type(exc).__name__}); it is sampled again", stacklevel=4)
            os.remove(path)
            continue
        x = got.get("sample") if isinstance(got, dict) else None
        want = {"index": i, "seed": seeds[i] & 0xFFFFFFFFFFFFFFFF}
        bad = [f"{k} {got.get(k)!r} (expected {v!r})" for k, v in want.items()
               if isinstance(got, dict) and got.get(k) != v]
        if not isinstance(x, torch.Tensor):
            bad.append("no sample tensor")
        elif tuple(x.shape) != tuple(shape) or x.dtype != dtype:
            bad.append(f"a {x.dtype} sample of shape {tuple(x.shape)} (expected {dtype} {tuple(shape)})")
        if bad:
            raise ValueError(f"out_dir file {path} is not this run's sample {i}: it holds {', '.join(bad)}; "
                             "remove it, or choose another out_dir")
        skip.add(i)
    return [i for i in mine if i not in skip]


def _write_atomic(path: str, obj: dict) -> None:
    # Serialise to memory first: torch.save names the zip archive after the file it writes to,
    # and the temporary name must not leak into the bytes (resumed files must be identical).
    buf = io.BytesIO()
    torch.save(obj, buf)
    d, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass
class _Group:
    """The ranks of one :func:`sample` call and the failure protocol between them."""

    rank: int
    world: int
    timeout: float
    status_group: Any = None
    store: Any = None
    comm_device: torch.device = torch.device("cpu")
    data_group: Any = None
    hosts_store: bool = False
    passed_at: float = 0.0  # when the last check passed (or the group was made)
    longest: float = 0.0  # longest stage on this rank so far, seconds

    @classmethod
    def create(cls, device: torch.device, timeout: float) -> "_Group":
        if not (dist.is_available() and dist.is_initialized()):
            world = _env_world()
            if world <= 1:
                return cls(0, 1, timeout)
            if not dist.is_available():
                raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # Joining may wait on slow starters (model loading on other hosts): at least 5 minutes.
            dist.init_process_group(backend, timeout=timedelta(seconds=max(timeout, 300.0)))
            # Kept for later calls and destroyed at exit, never re-made: see _OWNED.
            _OWNED["group"] = _default_group()
            if not _OWNED["atexit"]:
                atexit.register(_destroy_owned)
                _OWNED["atexit"] = True
        rank, world = dist.get_rank(), dist.get_world_size()
        if world == 1:
            return cls(0, 1, timeout)
        backend = dist.get_backend()
        # The failure flags travel on a gloo group of our own: gloo collectives raise Python
        # exceptions on a dead peer or a timeout (NCCL's watchdog would tear the process down without
        # saying who failed), and its op timeout is ``timeout``: a collective left pending by a hung
        # peer ends milliseconds after our wait gives up, not after the default group's timeout;
        # retire() waits for that, then joins the group's threads (abort() cancels nothing).
        status = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        _calls[0] += 1
        store = _StoreLine.open(f"fastdiff.distributed/{_calls[0]}/", min(timeout, STORE_REPLY_S))
        nccl = backend == "nccl" and device.type == "cuda"
        comm = device if nccl else torch.device("cpu")
        data = None if nccl else status  # samples: NCCL on GPUs, else our gloo group
        # env:// and tcp:// rendezvous host the store on rank 0, unless torchrun's agent hosts it.
        hosts = rank == 0 and not _agent_store()
        return cls(rank, world, timeout, status, store, comm, data, hosts, time.monotonic())

    def close(self) -> None:
        """After success: destroy our status group (no work is pending on it).

        The default group, if :func:`sample` created it, stays for later calls (see :data:`_OWNED`).
        """
        if self.status_group is not None:
            dist.destroy_process_group(self.status_group)
            if self.data_group is self.status_group:
                self.data_group = None
            self.status_group = None

    def retire(self, pending: Sequence[Any] = ()) -> None:
        """After a failure: destroy the status group once its worker threads have let go of everything.

        ``pending`` holds the failed collective's work object and its tensors; the caller keeps
        them referenced until this returns. Why: gloo runs a collective on a worker thread of its
        own (``pt_gloo_runloop``), which drops its reference to the work when the operation ends
        -- for a hung peer, when the group's op timeout (``timeout``) expires, a few milliseconds
        after our own wait gave up. If that is the last reference, the work's destructor runs on
        that thread and releases the tensors; releasing a C++ reference to a tensor that has a
        Python object decrements the Python object, under the GIL. When the caller had already
        printed the error and returned, the interpreter is exiting by then: taking the GIL ends
        the thread with ``pthread_exit``, whose forced unwinding through that ``noexcept``
        destructor calls ``std::terminate`` -- SIGABRT, "terminate called without an active
        exception" (seen with gdb: ``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject`` ->
        ``take_gil`` -> ``PyThread_exit_thread`` on ``pt_gloo_runloop``, the main thread in
        ``Py_FinalizeEx``). So wait (at most ``timeout`` + :data:`RETIRE_MARGIN_S`) until the work
        is completed, then destroy the group: dropping it joins its worker threads (with the GIL
        released), and our reference to the work makes sure none of them drops the last one. The
        work is then freed by the caller, on its own thread. Nothing of the group is left running
        when :func:`sample` raises.

        If the work never completes (not seen with gloo: its op timeout ends every operation), the
        group, the work and its tensors are deliberately leaked -- referenced forever, so no
        destructor of theirs runs, not even at exit -- instead of risking that abort.
        """
        _OWNED["failed"] = True
        group = self.status_group
        if group is None:
            return
        works = [w for w in pending if isinstance(w, dist.Work)]
        end = time.monotonic() + self.timeout + RETIRE_MARGIN_S
        while not all(w.is_completed() for w in works) and time.monotonic() < end:
            time.sleep(0.005)
        self.status_group = None
        if self.data_group is group:
            self.data_group = None
        if all(w.is_completed() for w in works):
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - already gone; the reference below is the last either way
                pass
            del group  # the last reference: ~ProcessGroupGloo joins the worker threads now
        else:
            _leak((group, *pending))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Run one stage, then agree with every rank that no one failed (see :meth:`check`)."""
        try:
            yield
        except Exception as exc:  # KeyboardInterrupt/SystemExit leave at once: peers see a dead rank
            if self.world == 1:
                raise  # one process: the original exception, unchanged
            self.check(name, exc)
            raise
        self.check(name, None)

    def _mark(self, key: str) -> None:
        if self.store is not None:
            self.store.set(key)

    def _seen(self, key: str) -> bool | None:
        """Whether ``key`` was marked; ``None`` when the store is unreachable."""
        return None if self.store is None else self.store.check(key)

    def check(self, name: str, error: BaseException | None) -> None:
        """All ranks exchange failure flags; raise :class:`RankFailedError` on every rank if any is set."""
        if self.world == 1:
            return
        self._mark(f"arrived/{name}/{self.rank}")
        arrived = time.monotonic()
        self.longest = max(self.longest, arrived - self.passed_at)
        flags = torch.zeros(self.world, dtype=torch.int32)
        if error is not None:
            flags[self.rank] = 1
        work = None
        try:
            work = dist.all_reduce(flags, group=self.status_group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as exc:  # noqa: BLE001 - a dead peer or a timeout; name who did not arrive
            lost = self._lost(name, exc, arrived)
            self.retire((work, flags))
            work = None  # ours was the last reference: the group's gloo context goes now, not at a later GC
            raise lost from (error or exc)
        del work
        failed = [r for r in range(self.world) if int(flags[r])]
        if not failed:
            self.passed_at = time.monotonic()
            return
        # Every rank is alive and in step: the messages travel on the group itself.
        msgs: list[str | None] = [None] * self.world
        mine = f"{type(error).__name__}: {_first_line(error)}" if error is not None else None
        try:
            dist.all_gather_object(msgs, mine, group=self.status_group)
        except Exception:  # noqa: BLE001 - the names are known without the messages
            pass
        self.retire()  # every collective above completed: nothing is pending
        detail = "; ".join(f"rank {r}: {msgs[r] or 'failed'}" for r in failed)
        who = "rank" if len(failed) == 1 else "ranks"
        raise RankFailedError(f"{who} {', '.join(map(str, failed))} failed during {name}; every rank stops. {detail}",
                              failed, name) from error

    def _lost(self, name: str, exc: BaseException, arrived: float) -> RankFailedError:
        """The collective failed: a rank died (its connections closed) or hung (timeout). Name it.

        Ranks merely slower than this one have not arrived yet either. All ranks left the last
        check together, so wait for their arrival marks until ``arrived + grace`` (see
        :data:`LOST_GRACE_S`; after a timeout that time has passed) and name the ranks still
        missing. The rank that hosts the store (rank 0 outside torchrun's agent) then keeps it up,
        for up to ``grace`` more, until the other survivors have read it. Meanwhile torch's warnings
        about failed store reads are kept off stderr (see :func:`_store_warnings_hidden`): the
        caller reports the failure in one line.
        """
        with _store_warnings_hidden():
            return self._name_missing(name, exc, arrived)

    def _name_missing(self, name: str, exc: BaseException, arrived: float) -> RankFailedError:
        grace = min(self.timeout, LOST_GRACE_S + 2 * self.longest)
        keys = [f"arrived/{name}/{r}" for r in range(self.world)]
        missing = None
        if self.store is not None:
            end = arrived + grace
            while True:
                seen = [self._seen(k) for k in keys]
                if any(v is None for v in seen):
                    missing = None  # the store is gone: its host died or left
                    break
                missing = [r for r, v in enumerate(seen) if not v]
                if not missing or time.monotonic() > end:
                    break
                time.sleep(0.05)
        if missing is None and self.rank != 0 and not _agent_store():
            missing = [0]  # env:// / tcp:// rendezvous: the store lives in rank 0's process
            head = f"rank 0 stopped responding during {name} (died or hung: the store it hosts is unreachable)"
        elif missing is None:
            head = f"a rank stopped responding during {name} (the store is unreachable, so which is unknown)"
        elif not missing:
            head = f"a rank stopped responding during {name} (every rank had arrived)"
        else:
            who = ("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing))
            head = (f"{who} stopped responding during {name} (died, or hung past timeout={self.timeout:g}s; "
                    f"had not arrived {max(time.monotonic() - arrived, grace):.3g}s after this rank)")
        if missing:
            self._mark(f"named/{name}/{self.rank}")
            if self.hosts_store:
                end = time.monotonic() + grace
                while time.monotonic() < end and not all(
                        self._seen(f"named/{name}/{r}") for r in range(self.world) if r not in missing):
                    time.sleep(0.05)
        return RankFailedError(f"{head}; this is rank {self.rank}. Collective error: {type(exc).__name__}: "
                               f"{_first_line(exc)}", missing or [], name)

    def gather(self, x: torch.Tensor, n: int, rank0_only: bool) -> torch.Tensor | None:
        """Padded all_gather / gather of every rank's block; concatenated in global order."""
        self._mark(f"arrived/gather/{self.rank}")
        arrived = time.monotonic()
        sizes = [len(shard(n, r, self.world)) for r in range(self.world)]
        m = max(sizes)
        pad = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=self.comm_device)
        pad[: x.shape[0]] = x.to(self.comm_device)
        # Raw bytes travel: exact for every dtype, whatever the backend supports.
        pad = pad.reshape(m, -1).view(torch.uint8)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        work = None
        try:
            if rank0_only:
                work = dist.gather(pad, parts if self.rank == 0 else None, dst=0, group=self.data_group,
                                   async_op=True)
            else:
                work = dist.all_gather(parts, pad, group=self.data_group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as exc:  # noqa: BLE001
            lost = self._lost("gather", exc, arrived)
            # gloo data (our status group): wait for it and join its threads; NCCL data (the default
            # group) is left to NCCL's own timeout handling.
            self.retire((work, pad, parts) if self.data_group is not None else ())
            work = None
            raise lost from exc
        if rank0_only and self.rank != 0:
            return None
        out = torch.cat([p[:s] for p, s in zip(parts, sizes)]).view(x.dtype).reshape(n, *x.shape[1:])
        return out.to(x.device)


_STORE_WARNING = re.compile(r"^(\[rank\d+\]:)?\[[WE]\S* [\d:.]+ \w+\.cpp:\d+\] \[c10d\] ")
_STORE_WARNING_TAIL = re.compile(r"^(Exception raised from |frame #\d+: |<omitting python frames>|\s*$)")


@contextmanager
def _store_warnings_hidden() -> Iterator[None]:
    """Keep torch's c10d warnings (a ``[W... TCPStore.cpp:N] [c10d] ...`` line and its C++ stack,
    printed by the store client whenever a read fails) off stderr; pass everything else through.

    Used only while naming failed ranks, when store reads are expected to fail (the store's host
    died or stopped). File descriptor 2 points at a temporary file meanwhile: whatever else any
    thread writes there is written to the real stderr afterwards, in order.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no stderr to protect
        yield
        return
    buf = tempfile.TemporaryFile()
    try:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
        buf.seek(0)
        kept, in_warning = [], False
        for line in buf.read().decode("utf-8", "replace").splitlines(keepends=True):
            if _STORE_WARNING.match(line):
                in_warning = True
            elif not (in_warning and _STORE_WARNING_TAIL.match(line)):
                in_warning = False
                kept.append(line)
        if kept:
            os.write(2, "".join(kept).encode())
    finally:
        os.close(saved)
        buf.close()


class _StoreLine:
    """The failure protocol's own connection to the process group's store (under a per-call prefix).

    A store client waits for each reply without a deadline (its ``timeout`` covers connecting, and
    waiting for keys on a live server), so on a stopped host (SIGSTOP, a frozen machine: the
    connection stays open) every read would block forever. Reads here are cut off after ``limit``
    seconds: a timer shuts our connection's socket down, the read fails, and the store counts as
    unreachable from then on. The connection is a clone of the default store's, so cutting it
    leaves the process group's own intact. Where it cannot be identified (a store that is not a
    TCPStore, a platform without ``/proc``), reads have no deadline, as the store itself has none.
    Failures print torch's own warning once; no read is tried after one.
    """

    def __init__(self, store, fd: int | None, limit: float):
        self.store, self.fd, self.limit = store, fd, limit
        self.dead = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, prefix: str, limit: float) -> "_StoreLine | None":
        """Connect to the default group's store; ``None`` if it has none (failures are then raised
        without naming the missing ranks)."""
        try:
            base = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001
            return None
        under = base
        while isinstance(under, dist.PrefixStore):
            under = under.underlying_store
        port = under.port if isinstance(under, dist.TCPStore) else None
        before = _sockets()
        try:
            conn = base.clone()
        except Exception:  # noqa: BLE001 - no second connection: share the group's, never cut it
            return cls(dist.PrefixStore(prefix, base), None, limit)
        new = [fd for fd, link in _sockets() - before if port is not None and _peer_port(fd) == port]
        return cls(dist.PrefixStore(prefix, conn), new[0] if len(new) == 1 else None, limit)

    def set(self, key: str) -> None:
        """Mark ``key`` (a store write is not answered: it does not block on a stopped host)."""
        if not self.dead:
            try:
                self.store.set(key, "1")
            except Exception:  # noqa: BLE001 - the store's host may be the rank that died
                self.dead = True

    def check(self, key: str) -> bool | None:
        """Whether ``key`` is marked; ``None`` if the store is unreachable (now or before)."""
        if self.dead:
            return None
        timer = None
        if self.fd is not None:
            timer = threading.Timer(self.limit, self._cut)
            timer.daemon = True
            timer.start()
        try:
            got: bool | None = bool(self.store.check([key]))
        except Exception:  # noqa: BLE001 - the store's host died, or the timer cut a read it never answered
            got = None
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()  # no watchdog thread outlives its read
        with self._lock:
            if got is None:
                self.dead = True
            return None if self.dead else got

    def _cut(self) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = True
        try:
            s = socket.socket(fileno=os.dup(self.fd))
            try:
                s.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once, with an error
            finally:
                s.close()
        except OSError:
            pass


def _sockets() -> set[tuple[int, str]]:
    """``(fd, 'socket:[inode]')`` of this process's open sockets (empty without ``/proc``)."""
    out = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out.add((int(fd), link))
    return out


def _peer_port(fd: int) -> int | None:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return s.getpeername()[1]
    except (OSError, IndexError, TypeError):
        return None
    finally:
        s.close()


def _first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message (a RankFailedError message is one line)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def _agent_store() -> bool:
    """Whether torchrun's agent hosts the store (else rank 0 does, for env:// and tcp://)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU; a ``ValueError`` names a bad ``LOCAL_RANK``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    text = os.environ.get("LOCAL_RANK", "0") or "0"
    try:
        local = int(text)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an int >= 0 (the default device is cuda:LOCAL_RANK), "
                         f"got {text!r}") from None
    if not 0 <= local < torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local} names no CUDA device (this host has {torch.cuda.device_count()}); "
                         f"pass device= explicitly")
    return torch.device("cuda", local)


def _check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` this process can use, else a ``TypeError``/``ValueError`` naming it."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a string such as 'cpu' or 'cuda:0', "
                        f"got {type(device).__name__} {device!r}")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be a torch.device or a string such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None
    if d.type == "meta":
        raise ValueError(f"device {device!r} holds no data (meta is shape only); give 'cpu' or 'cuda:K'")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} needs CUDA, but torch.cuda.is_available() is False on this host")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} names no CUDA device (this host has {torch.cuda.device_count()})")
    elif d.type != "cpu":
        try:
            torch.empty(0, device=d)
        except Exception as exc:  # noqa: BLE001 - no such backend in this build or on this host
            raise ValueError(f"device {device!r} is not available here ({type(exc).__name__})") from None
    return d


def _check_out_dir_arg(out_dir) -> None:
    """``out_dir`` is a non-empty ``str`` or ``os.PathLike`` path, else a ``TypeError``/``ValueError``."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a folder path (str or os.PathLike), got {type(out_dir).__name__} {out_dir!r}")
    path = os.fspath(out_dir)
    if not isinstance(path, str):
        raise TypeError(f"out_dir must be a str path (bytes paths are not supported), got {out_dir!r}")
    if not path or "\0" in path:
        raise ValueError(f"out_dir must be a non-empty folder path without NUL characters, got {out_dir!r}")


def _make_out_dir(out_dir) -> None:
    """Create ``out_dir`` if needed and check it can take files; a ``ValueError`` naming it otherwise.

    Run by every rank in the set-up stage (the folder may be local to each host), before anything
    is written; nothing is left behind when it fails.
    """
    path = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(path) and not os.path.exists(path):
        raise ValueError(f"out_dir {os.fspath(out_dir)!r} is a broken symbolic link")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"out_dir {os.fspath(out_dir)!r} exists and is not a folder")
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"out_dir {os.fspath(out_dir)!r} cannot be created: {parent!r} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"out_dir {os.fspath(out_dir)!r} cannot be created: {parent!r} is not writable")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"out_dir {os.fspath(out_dir)!r} cannot be created ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {os.fspath(out_dir)!r} is not writable")
    try:  # os.access trusts permission bits (root passes them all); a real file tells
        fd, probe = tempfile.mkstemp(prefix=".fastdiff-probe-", suffix=".tmp", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"out_dir {os.fspath(out_dir)!r} is not writable ({exc.strerror or exc})") from None


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
            raise TypeError(f"seeds must be integers, got a {seeds.dtype} tensor")
        seeds = seeds.reshape(-1).tolist()
    if isinstance(seeds, (int, str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints (the global list, one per sample), got {seeds!r}")
    out = []
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"seeds[{i}] must be an int, got {s!r}")
        if not -(2**63) <= s < 2**64:
            raise ValueError(f"seeds[{i}] must fit in 64 bits, got {s}")
        out.append(_signed64(s))
    if not out:
        raise ValueError("seeds must not be empty")
    return out


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) or not isinstance(shape, Sequence):
        raise TypeError(f"noise must be the shape of one sample (a sequence of ints) or an [N, ...] tensor, "
                        f"got {shape!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"noise shape must be ints >= 1, got {tuple(shape)!r}")
    return tuple(shape)


def _check_batch(name: str, c, n: int) -> None:
    """``conds``/``unconds``: ``None``, an ``[N, ...]`` tensor, a dict (nested dicts allowed) whose
    tensors are ``[N, ...]``, or a sequence of ``N`` per-sample tensors or dicts of one structure
    (tensors of one shape, dtype and device per place; other values equal), else a
    ``TypeError``/``ValueError`` naming the place. Nothing is copied or changed."""
    if c is None:
        return
    if isinstance(c, (torch.Tensor, Mapping)):
        validate.conditioning(name, c, n, expect=f"have one entry per seed ({n})",
                              split_lists="per-sample values must be an [N, ...] tensor (a {} would reach every "
                                          "chunk whole, not split by sample)")
    elif isinstance(c, Sequence) and not isinstance(c, (str, bytes)):
        if len(c) != n:
            raise ValueError(f"{name} has {len(c)} entries but seeds has {n}")
        first = c[0]
        if not isinstance(first, (torch.Tensor, Mapping)):
            raise TypeError(f"{name}[0] must be a tensor or a dict (one per sample), got {_what(first)}")
        for i in range(n):
            _same_structure(f"{name}[{i}]", c[i], f"{name}[0]", first)
    else:
        raise TypeError(f"{name} must be a tensor, a dict of tensors or a sequence, got {type(c).__name__}")


def _what(v) -> str:
    return f"{type(v).__name__} {v!r}" if isinstance(v, (int, float, complex, str, bytes)) else type(v).__name__


def _same_structure(where: str, v, where0: str, v0) -> None:
    """Per-sample entry ``v`` has the structure of entry ``v0`` (see :func:`_check_batch`)."""
    if isinstance(v0, torch.Tensor):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where} must be a tensor like {where0}, got {_what(v)}")
        if v.is_meta:
            raise ValueError(f"{where} is a meta tensor (shape only, no data)")
        for what, a, b in (("shape", tuple(v.shape), tuple(v0.shape)), ("dtype", v.dtype, v0.dtype),
                           ("device", v.device, v0.device)):
            if a != b:
                raise ValueError(f"{where} has {what} {a} but {where0} has {what} {b}: per-sample entries are "
                                 f"stacked and must all have one {what}")
    elif isinstance(v0, Mapping):
        if not isinstance(v, Mapping):
            raise TypeError(f"{where} must be a dict like {where0}, got {_what(v)}")
        if set(v) != set(v0):
            raise ValueError(f"{where} has keys {sorted(map(str, v))} but {where0} has {sorted(map(str, v0))}: "
                             f"per-sample dicts must all have the same keys")
        for k in v0:
            if not isinstance(k, str):
                raise TypeError(f"{where0} keys are keyword arguments of the model and must be strings, got {k!r}")
            _same_structure(f"{where}[{k!r}]", v[k], f"{where0}[{k!r}]", v0[k])
    elif isinstance(v0, (list, tuple)) or isinstance(v, (list, tuple)):
        bad = v0 if isinstance(v0, (list, tuple)) else v
        raise TypeError(f"{where if bad is v else where0} is a {type(bad).__name__}: per-sample values must be "
                        f"tensors (lists are not stacked)")
    elif isinstance(v, (torch.Tensor, Mapping)):
        raise TypeError(f"{where} is a {type(v).__name__} but {where0} is {_what(v0)}: per-sample entries must all "
                        f"have one structure")
    else:
        try:
            equal = v is v0 or bool(v == v0)
        except Exception:  # noqa: BLE001 - incomparable: not the same value
            equal = False
        if not equal:
            raise ValueError(f"{where} is {v!r} but {where0} is {v0!r}: values other than tensors are not stacked, "
                             f"the first sample's is used for every sample, so they must be equal")
