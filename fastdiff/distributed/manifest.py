"""The record of every setting that determines a folder of samples, so that a resumed run can never
mix two sets (:func:`fastdiff.distributed.sample` with ``out_dir``, and ``fastdiff sample --out``).

A manifest is a JSON object written to ``{out_dir}/fastdiff-sample.json`` before the first sample
file. It holds a canonical description (:func:`describe`) of:

- ``fastdiff``: the version (informational) and :data:`NUMERICS`, the number of the arithmetic
  that turns settings into samples. A run with another fastdiff version is accepted when
  ``NUMERICS`` is the same (the samples cannot differ) and refused when it is not;
- ``samples``: the number of samples, their seeds (a digest), the shape, dtype, device type, the
  backend the run resolves to (``auto`` included) and the global noise tensor's content when one
  is given;
- ``model``: the caller's ``model_id`` when given, else the model's identity: the SHA-256 of an
  ``nn.Module``'s state dict (parameters and buffers, computed once per call), or for a plain
  function its qualified name plus the identity of the modules, tensors and numbers it closes over;
- ``conds``, ``unconds`` and every other sampling argument (sampler, steps, the schedule's
  CONTENT, sampler options, guidance, plan, backend, ...): numbers, strings and structure as they
  are, tensors and arrays by shape, dtype and SHA-256 of their bytes, dataclasses (schedules, plans)
  field by field, long sequences by digest;
- ``run``: whatever the caller adds (the command line records its flags there).

What cannot be described (an arbitrary object's hidden state, the code behind a function's name)
is recorded by type or name only; give ``model_id`` to name a model whose identity is not in its
tensors. Batch size, timeout, gather mode and the resume flag do not change the samples and are not
recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

FILE = "fastdiff-sample.json"
"""The manifest's file name inside the output folder."""
FORMAT = 2
"""Layout of the manifest itself (1 was the command line's flat list of flags)."""
NUMERICS = 1
"""Bumped by every fastdiff change after which the same settings can give different samples
(kernel arithmetic, noise streams, plan construction). Resuming across fastdiff versions is
refused only when this differs."""
SAMPLE_FILE = re.compile(r"^\d{6,}-seed\d+\.pt$")
"""Names of per-sample files (:func:`fastdiff.distributed.sample_path`)."""

_LONG = 64  # sequences longer than this are recorded by digest
_DEPTH = 8


class ManifestError(ValueError):
    """The output folder holds samples of a run with other settings (or of an unrecorded run).

    Attributes:
        differences: ``(path, recorded, now)`` per differing setting, ``path`` dotted
            (``settings.schedule.beta_end``, ``run.steps``); empty when nothing was recorded.
    """

    def __init__(self, message: str, differences: Sequence[tuple[str, Any, Any]] = ()):
        super().__init__(message)
        self.differences = list(differences)


def _sha256_tensor(t: torch.Tensor) -> str:
    t = t.detach()
    if t.is_meta:
        raise ValueError("a meta tensor has no data to record")
    b = t.to("cpu").contiguous().reshape(-1)
    raw = b.view(torch.uint8) if b.element_size() and b.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _float(v: float) -> float | str:
    f = float(v)
    return f if math.isfinite(f) else repr(f)  # JSON has no NaN/Inf that compares equal


def _qualname(obj: Any) -> str:
    mod = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{mod}.{name}"


def describe(value: Any, _depth: int = 0) -> Any:
    """A JSON-compatible description of ``value`` that is equal for equal settings (see the module
    docstring for what each kind of value becomes)."""
    if _depth > _DEPTH:
        return {"type": _qualname(type(value)), "note": "nested too deep to record"}
    d = _depth + 1
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return describe(value.item(), d)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dim() == 0:
            return {"tensor": [], "dtype": str(value.dtype), "value": describe(value.item(), d)}
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha256": _sha256_tensor(value)}
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        return {"array": list(a.shape), "dtype": str(a.dtype), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    if isinstance(value, torch.nn.Module):
        return {"module": _qualname(type(value)), "state_dict_sha256": state_dict_sha256(value)}
    if isinstance(value, Mapping):
        return {str(k): describe(v, d) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [describe(v, d) for v in value]
        if len(items) > _LONG:
            text = json.dumps(items, sort_keys=True)
            return {"sequence": len(items), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        return items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": _qualname(type(value)),
                **{f.name: describe(getattr(value, f.name), d) for f in dataclasses.fields(value) if f.compare}}
    config = getattr(value, "config", None)
    if isinstance(config, Mapping):  # diffusers schedulers and models
        return {"type": _qualname(type(value)), "config": describe(dict(config), d)}
    if isinstance(value, functools.partial):
        return {"partial": describe(value.func, d), "args": describe(value.args, d),
                "keywords": describe(value.keywords, d)}
    if isinstance(value, types.MethodType):
        return {"method": value.__func__.__qualname__, "of": describe(value.__self__, d)}
    if isinstance(value, types.FunctionType):
        out: dict[str, Any] = {"function": _qualname(value)}
        cells = {}
        for name, cell in zip(value.__code__.co_freevars, value.__closure__ or ()):
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(v, (torch.nn.Module, torch.Tensor, np.ndarray, int, float, str, bool)) \
                    or dataclasses.is_dataclass(v) or callable(v):
                cells[name] = describe(v, d)
        if cells:
            out["closure"] = cells
        if value.__defaults__:
            out["defaults"] = describe(value.__defaults__, d)
        return out
    return {"type": _qualname(type(value))}


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict: every entry's name, shape, dtype and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(_sha256_tensor(t).encode())
    return h.hexdigest()


def model_identity(model: Any, model_id: str | None = None) -> Any:
    """``{"model_id": model_id}`` when the caller names the model, else :func:`describe` of it."""
    if model_id is not None:
        if not isinstance(model_id, str) or not model_id:
            raise TypeError(f"model_id must be a non-empty string naming the model and its weights, got {model_id!r}")
        return {"model_id": model_id}
    return describe(model)


def seeds_digest(seeds: Sequence[int]) -> str:
    """SHA-256 of the seeds as unsigned 64-bit words, in order."""
    return hashlib.sha256(b"".join((s & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for s in seeds)).hexdigest()


def build(*, seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype, device: torch.device,
          noise: torch.Tensor | None, model: Any, model_id: str | None, conds: Any, unconds: Any,
          settings: Mapping[str, Any], run: Mapping[str, Any] | None = None, backend: str | None = None) -> dict:
    """The manifest of one run (JSON-compatible, normalised as it reads back). ``backend``: the
    backend the run resolves to (``auto`` may resolve differently on another machine, and backends
    agree to rounding, not bit for bit, for every sampler)."""
    from .. import __version__

    doc = {
        "format": FORMAT,
        "fastdiff": {"version": __version__, "numerics": NUMERICS},
        "samples": {"n": len(seeds), "seeds_sha256": seeds_digest(seeds), "shape": list(shape), "dtype": str(dtype),
                    "device": torch.device(device).type, "noise": describe(noise), "backend": backend},
        "model": model_identity(model, model_id),
        "conds": describe(conds),
        "unconds": describe(unconds),
        "settings": describe(dict(settings)),
        "run": describe(dict(run or {})),
    }
    return json.loads(json.dumps(doc, sort_keys=True))


_INFORMATIONAL = {"fastdiff.version"}


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Every ``(dotted path, old, new)`` where two manifests disagree (informational keys skipped)."""
    if path in _INFORMATIONAL:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            sub = f"{path}.{k}" if path else k
            if k not in old or k not in new:
                if sub not in _INFORMATIONAL:
                    out.append((sub, old.get(k, "(not recorded)"), new.get(k, "(not recorded)")))
            else:
                out.extend(differences(old[k], new[k], sub))
        return out
    return [] if old == new else [(path, old, new)]


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def format_differences(diffs: Sequence[tuple[str, Any, Any]]) -> str:
    """``"settings.steps was 6, now 7; ..."`` (long values shortened)."""
    return "; ".join(f"{p} was {_short(a)}, now {_short(b)}" for p, a, b in diffs)


def sample_files(out_dir: str | os.PathLike) -> list[str]:
    """The per-sample files in ``out_dir`` (names only), whatever run wrote them."""
    try:
        return sorted(e for e in os.listdir(out_dir) if SAMPLE_FILE.match(e))
    except FileNotFoundError:
        return []


def check(out_dir: str | os.PathLike, manifest: dict, *, write: bool) -> None:
    """Refuse an ``out_dir`` that holds sample files of another run; record this run's manifest.

    Raises :class:`ManifestError` when the folder holds sample files and its manifest differs from
    ``manifest`` (naming every difference), is missing, or cannot be read. A folder without sample
    files takes the new manifest whatever it held (nothing could mix). With ``write`` (one rank
    only), the manifest is written atomically when absent or replaced. Ranks only read otherwise,
    so no barrier is needed: the sample files are written after every rank has checked.
    """
    folder = os.fspath(out_dir)
    path = os.path.join(folder, FILE)
    files = sample_files(folder)
    old = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            if files:
                raise ManifestError(f"out_dir {folder!r} holds {len(files)} sample files but its manifest {FILE} "
                                    f"cannot be read ({exc}); the files cannot be checked against this run's "
                                    "settings: choose another out_dir") from None
    if files:
        if old is None:
            raise ManifestError(f"out_dir {folder!r} holds {len(files)} sample files (e.g. {files[0]}) but no "
                                f"manifest ({FILE}) saying which settings made them; they cannot be checked against "
                                "this run's: choose another out_dir")
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise ManifestError(f"out_dir {folder!r} holds sample files recorded by an older fastdiff manifest "
                                f"(format {old.get('format', 1) if isinstance(old, dict) else '?'}, now {FORMAT}) "
                                "that does not record every setting: choose another out_dir")
        diffs = differences(old, manifest)
        if diffs:
            raise ManifestError(f"out_dir {folder!r} holds samples of a run with other settings ("
                                f"{format_differences(diffs)}); choose another out_dir, or resume with the "
                                "recorded settings", diffs)
        return
    if write and old != manifest:
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
