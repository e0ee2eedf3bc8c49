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
at once on the others; a rank that hangs makes it time out. For these, every rank posts an
"arrived" mark to the process group's store before the collective; after a failure the survivors
wait for slower ranks' marks (twice this rank's longest stage plus :data:`LOST_GRACE_S`, at most
``timeout``) and name the ranks still missing (a rank slower than that is named too, with wording
that says so). If the store is unreachable, its host died: rank 0 when launched without
torchrun's agent (then rank 0 is named), else the agent (then the rank is unknown). Files already
written stay complete: each is written to a temporary file in ``out_dir`` and renamed.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import api, manifest
from .rng import _signed64, randn

LOST_GRACE_S = 2.0
"""After a collective fails, a rank waits this long plus twice its longest stage so far (from the
last check to its arrival), at most ``timeout``, from its own arrival, for slower ranks' marks."""
INIT_ROW = 2**32 - 1
"""Philox row (counter word 2) of the initial noise; plan rows count up from 0 and never reach it."""

_FORBIDDEN = {
    "seed": "give the global list as seeds=",
    "generator": "torch.Generator noise is not keyed per sample; distributed sampling uses Philox seeds",
    "cond": "give the global per-sample conditions as conds=",
    "uncond": "give the global per-sample unconditional conditions as unconds=",
}
_calls = [0]  # per-process call counter: every rank calls in the same order, so keys agree


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
    rank) and destroyed again on success.

    Args:
        model: the model, as for :func:`fastdiff.sample` (the same weights on every rank).
        noise: the shape of ONE sample (e.g. ``(4, 64, 64)``): initial noise is
            :func:`initial_noise` keyed by each sample's seed; or an ``[N, ...]`` tensor of global
            initial noise, identical on every rank, of which each rank takes its rows.
        seeds: ``N`` 64-bit seeds, one per sample, the same list on every rank.
        conds, unconds: optional per-sample conditioning for the whole batch: an ``[N, ...]``
            tensor, a dict whose tensors are ``[N, ...]`` (other values are passed as they are),
            or a sequence of ``N`` per-sample tensors or dicts (stacked).
        out_dir: if given, every sample is written, as soon as its chunk is done, to
            :func:`sample_path` (``torch.save`` of a dict, written to a temporary file in
            ``out_dir`` and renamed, so a file is complete or absent).
        resume: with ``out_dir``: skip samples whose file exists and holds this sample (it is loaded
            and its index, seed, shape and dtype checked; a file that cannot be loaded is sampled
            again, with a warning; one that holds another sample is an error). Without it, existing
            sample files are an error. Either way the folder's manifest (:mod:`fastdiff.manifest`,
            written before the first sample) must record the same settings as this call whenever the
            folder holds sample files: a :class:`fastdiff.manifest.ManifestError` names each setting
            that differs.
        batch_size: most samples per :func:`fastdiff.sample` call on one rank (default: the rank's
            whole share). Failures are checked and files written after each such chunk.
        gather: without ``out_dir``: ``"all"`` returns ``[N, ...]`` on every rank, ``"rank0"`` on
            rank 0 only (``None`` elsewhere), ``"none"`` returns each rank's own share.
        dtype: storage dtype of the state when ``noise`` is a shape.
        device: where to sample (default: ``noise``'s device, else ``cuda:LOCAL_RANK`` when CUDA
            is available, else CPU).
        timeout: seconds a rank waits for the others at a chunk boundary or gather before it
            gives up and names the ranks that did not arrive. Must exceed the longest chunk.
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
        RankFailedError: on every rank, naming the failed ranks, when any rank raised, died or
            timed out (world size > 1). With world size 1 the original exception propagates.
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
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the folder of per-sample files to resume)")
    if model_id is not None and (not isinstance(model_id, str) or not model_id):
        raise TypeError(f"model_id must be a non-empty string naming the model and its weights, got {model_id!r}")
    if record is not None and not isinstance(record, Mapping):
        raise TypeError(f"record must be a mapping of settings to record in the manifest, got {type(record).__name__}")
    if isinstance(noise, torch.Tensor):
        if noise.dim() < 1 or noise.shape[0] != n:
            raise ValueError(f"noise tensor must be [N, ...] with N = len(seeds) = {n}, got shape {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must have a floating dtype, got {noise.dtype}")
        shape, dtype = tuple(noise.shape[1:]), noise.dtype
        device = torch.device(device) if device is not None else noise.device
    else:
        shape = _check_shape(noise)
        device = torch.device(device) if device is not None else _default_device()
    _check_batch("conds", conds, n)
    _check_batch("unconds", unconds, n)

    grp = _Group.create(device, timeout)
    result = _run(grp, model, noise, shape, dtype, device, seeds, conds, unconds, out_dir, resume, batch_size,
                  gather, sample_kwargs, model_id, record)
    grp.close()  # only on success: after a failure the process is expected to exit
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
            os.makedirs(out_dir, exist_ok=True)
            doc = manifest.build(seeds=seeds, shape=shape, dtype=dtype, device=device,
                                 noise=noise if isinstance(noise, torch.Tensor) else None, model=model,
                                 model_id=model_id, conds=conds, unconds=unconds, settings=kwargs, run=record)
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
    if c is None:
        return None
    if isinstance(c, torch.Tensor):
        return c[torch.tensor(idx, device=c.device)].to(device)
    if isinstance(c, Mapping):
        return {k: _select(v, idx, device) if isinstance(v, torch.Tensor) else v for k, v in c.items()}
    items = [c[i] for i in idx]
    if isinstance(items[0], Mapping):
        return {k: torch.stack([it[k] for it in items]).to(device) if isinstance(items[0][k], torch.Tensor)
                else items[0][k] for k in items[0]}
    return torch.stack([torch.as_tensor(it) for it in items]).to(device)


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
    created: bool = False
    status_group: Any = None
    store: Any = None
    comm_device: torch.device = torch.device("cpu")
    data_group: Any = None
    hosts_store: bool = False
    passed_at: float = 0.0  # when the last check passed (or the group was made)
    longest: float = 0.0  # longest stage on this rank so far, seconds

    @classmethod
    def create(cls, device: torch.device, timeout: float) -> "_Group":
        created = False
        if not (dist.is_available() and dist.is_initialized()):
            world = int(os.environ.get("WORLD_SIZE", "1") or "1")
            if world <= 1:
                return cls(0, 1, timeout)
            if not dist.is_available():
                raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # Joining may wait on slow starters (model loading on other hosts): at least 5 minutes.
            dist.init_process_group(backend, timeout=timedelta(seconds=max(timeout, 300.0)))
            created = True
        rank, world = dist.get_rank(), dist.get_world_size()
        if world == 1:
            return cls(0, 1, timeout, created)
        backend = dist.get_backend()
        # The failure flags travel on a gloo group of our own: gloo collectives raise Python
        # exceptions on a dead peer or a timeout (NCCL's watchdog would tear the process down without
        # saying who failed), and its op timeout is ``timeout``: a collective left pending by a hung
        # peer expires with our wait, instead of blocking the process's exit for the default
        # group's timeout (gloo's destructor waits for pending work; abort() does not cancel it).
        status = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        _calls[0] += 1
        store = None
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            store = dist.PrefixStore(f"fastdiff.distributed/{_calls[0]}/", _get_default_store())
        except Exception:  # noqa: BLE001 - without the store, failures are still raised, just less precisely
            store = None
        comm = device if backend == "nccl" else torch.device("cpu")
        data = None if backend == "nccl" else status  # samples: NCCL on GPUs, else our gloo group
        # env:// and tcp:// rendezvous host the store on rank 0, unless torchrun's agent hosts it.
        hosts = rank == 0 and not _agent_store()
        return cls(rank, world, timeout, created, status, store, comm, data, hosts, time.monotonic())

    def close(self) -> None:
        """Destroy our status group, and the default group if :func:`sample` created it."""
        if self.status_group is not None:
            dist.destroy_process_group(self.status_group)
        if self.created:
            dist.destroy_process_group()

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

    def _store(self, op: str, *args):
        if self.store is None:
            return None
        try:
            return getattr(self.store, op)(*args)
        except Exception:  # noqa: BLE001 - the store's host may be the rank that died
            return None

    def check(self, name: str, error: BaseException | None) -> None:
        """All ranks exchange failure flags; raise :class:`RankFailedError` on every rank if any is set."""
        if self.world == 1:
            return
        self._store("set", f"arrived/{name}/{self.rank}", "1")
        arrived = time.monotonic()
        self.longest = max(self.longest, arrived - self.passed_at)
        flags = torch.zeros(self.world, dtype=torch.int32)
        if error is not None:
            flags[self.rank] = 1
        try:
            work = dist.all_reduce(flags, group=self.status_group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as exc:  # noqa: BLE001 - a dead peer or a timeout; name who did not arrive
            raise self._lost(name, exc, arrived) from (error or exc)
        failed = [r for r in range(self.world) if int(flags[r])]
        if not failed:
            self.passed_at = time.monotonic()
            return
        # Every rank is alive and in step: the messages travel on the group itself.
        msgs: list[str | None] = [None] * self.world
        mine = f"{type(error).__name__}: {error}" if error is not None else None
        try:
            dist.all_gather_object(msgs, mine, group=self.status_group)
        except Exception:  # noqa: BLE001 - the names are known without the messages
            pass
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
        for up to ``grace`` more, until the other survivors have read it.
        """
        grace = min(self.timeout, LOST_GRACE_S + 2 * self.longest)
        keys = [f"arrived/{name}/{r}" for r in range(self.world)]
        missing = None
        if self.store is not None:
            end = arrived + grace
            while True:
                seen = [self._store("check", [k]) for k in keys]
                if any(v is None for v in seen):
                    missing = None  # the store is gone: its host died or left
                    break
                missing = [r for r, v in enumerate(seen) if not v]
                if not missing or time.monotonic() > end:
                    break
                time.sleep(0.05)
        if missing is None and self.rank != 0 and not _agent_store():
            missing = [0]  # env:// / tcp:// rendezvous: the store lives in rank 0's process
            head = f"rank 0 stopped responding during {name} (died: the store it hosts is unreachable)"
        elif missing is None:
            head = f"a rank stopped responding during {name} (the store is unreachable, so which is unknown)"
        elif not missing:
            head = f"a rank stopped responding during {name} (every rank had arrived)"
        else:
            who = ("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing))
            head = (f"{who} stopped responding during {name} (died, or hung past timeout={self.timeout:g}s; "
                    f"had not arrived {max(time.monotonic() - arrived, grace):.3g}s after this rank)")
        if missing:
            self._store("set", f"named/{name}/{self.rank}", "1")
            if self.hosts_store:
                end = time.monotonic() + grace
                while time.monotonic() < end and not all(
                        self._store("check", [f"named/{name}/{r}"]) for r in range(self.world) if r not in missing):
                    time.sleep(0.05)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return RankFailedError(f"{head}; this is rank {self.rank}. Collective error: {type(exc).__name__}: {first}",
                               missing or [], name)

    def gather(self, x: torch.Tensor, n: int, rank0_only: bool) -> torch.Tensor | None:
        """Padded all_gather / gather of every rank's block; concatenated in global order."""
        self._store("set", f"arrived/gather/{self.rank}", "1")
        arrived = time.monotonic()
        sizes = [len(shard(n, r, self.world)) for r in range(self.world)]
        m = max(sizes)
        pad = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=self.comm_device)
        pad[: x.shape[0]] = x.to(self.comm_device)
        # Raw bytes travel: exact for every dtype, whatever the backend supports.
        pad = pad.reshape(m, -1).view(torch.uint8)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        try:
            if rank0_only:
                work = dist.gather(pad, parts if self.rank == 0 else None, dst=0, group=self.data_group,
                                   async_op=True)
            else:
                work = dist.all_gather(parts, pad, group=self.data_group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as exc:  # noqa: BLE001
            raise self._lost("gather", exc, arrived) from exc
        if rank0_only and self.rank != 0:
            return None
        out = torch.cat([p[:s] for p, s in zip(parts, sizes)]).view(x.dtype).reshape(n, *x.shape[1:])
        return out.to(x.device)


def _agent_store() -> bool:
    """Whether torchrun's agent hosts the store (else rank 0 does, for env:// and tcp://)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or "0"))
    return torch.device("cpu")


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
    if c is None:
        return
    if isinstance(c, torch.Tensor):
        if c.dim() < 1 or c.shape[0] != n:
            raise ValueError(f"{name} must have one entry per seed ({n}), got shape {tuple(c.shape)}")
    elif isinstance(c, Mapping):
        for k, v in c.items():
            if isinstance(v, torch.Tensor) and (v.dim() < 1 or v.shape[0] != n):
                raise ValueError(f"{name}[{k!r}] must have one entry per seed ({n}), got shape {tuple(v.shape)}")
    elif isinstance(c, Sequence) and not isinstance(c, (str, bytes)):
        if len(c) != n:
            raise ValueError(f"{name} has {len(c)} entries but seeds has {n}")
    else:
        raise TypeError(f"{name} must be a tensor, a dict of tensors or a sequence, got {type(c).__name__}")
