"""A probe for host-syncing operations, usable on CPU tensors.

On a GPU, reading a device value on the host (``.item()``, ``bool(t)``, ``if t.any():``,
``.tolist()``, ``.cpu()``, ``torch.equal``/``allclose``, ``nonzero`` and other data-dependent
shapes, a tensor made from Python data inside the loop) waits for the device and cannot be
captured in a CUDA graph. On CPU the same calls are free, so a test sees nothing wrong; this probe
records them anyway, as PyTorch dispatches them:

- at the ATen level (:class:`TorchDispatchMode`): ``_local_scalar_dense`` (every tensor-to-Python
  scalar conversion ends there), ``is_nonzero``, ``nonzero``, ``equal``, ``masked_select``, the
  ``unique`` family, ``lift_fresh`` (``torch.tensor(data)``), a copy to the CPU from another device;
- at the Python level (:class:`TorchFunctionMode`), for what never reaches ATen on CPU tensors:
  ``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``/``__int__``/``__float__``/``__index__``,
  ``__repr__``/``__format__`` (printing), ``allclose``.

``t[idx] = 1.0`` (a Python number) is not reported: PyTorch makes the number a CPU scalar tensor
(``lift_fresh`` under a dispatch mode) and fills the slice with it (``copy_to`` -> ``fill_``), a
kernel with the value as its argument on a GPU, no copy. (``.to(device)`` is not flagged: on CPU
  tests the executor's own device is the CPU, so moving to it is no sign of a sync.)

Each record names the innermost frame in fastdiff (``file:line``), so a failure points at the line.
"""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_ATEN = {"_local_scalar_dense", "is_nonzero", "nonzero", "nonzero_static", "equal", "masked_select", "unique_dim",
             "_unique", "_unique2", "unique_consecutive", "unique_dim_consecutive", "lift_fresh", "item"}
"""ATen operations that read device data on the host or have data-dependent output shapes."""

_T = torch.Tensor
SYNC_METHODS = {_T.item: "item", _T.tolist: "tolist", _T.cpu: "cpu", _T.numpy: "numpy", _T.__bool__: "__bool__",
                _T.__int__: "__int__", _T.__float__: "__float__", _T.__index__: "__index__", _T.__repr__: "__repr__",
                _T.__format__: "__format__", torch.allclose: "allclose", torch.equal: "equal", _T.equal: "equal",
                _T.allclose: "allclose"}
"""Python-level calls that sync on a GPU but stay on the host (never dispatched) with CPU tensors."""

_PKG = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep + "fastdiff" + os.sep
_HERE = os.path.abspath(__file__)


def _where() -> str:
    """``file:line (function)`` of the innermost caller outside torch and this probe, followed by
    ``via`` the innermost frame in the fastdiff package where that is another one."""
    stack = [f for f in traceback.extract_stack()[:-2]
             if f.filename != _HERE and f"{os.sep}torch{os.sep}" not in f.filename]
    if not stack:
        return "?"

    def name(f) -> str:
        path = os.path.relpath(f.filename, os.path.dirname(_PKG)) if f.filename.startswith(_PKG) else \
            os.path.basename(f.filename)
        return f"{path}:{f.lineno} ({f.name})"

    inner = stack[-1]
    ours = next((f for f in reversed(stack) if f.filename.startswith(_PKG)), None)
    return name(inner) if ours is None or ours is inner else f"{name(inner)} via {name(ours)}"


class SyncProbe:
    """Records host-syncing operations while :attr:`on` (switch it on and off around the code under
    test; the modes stay installed for the whole ``with probe.installed():``)."""

    def __init__(self) -> None:
        self.on = False
        self.records: list[tuple[str, str]] = []
        self._scalar_setitem = 0  # inside t[idx] = <Python number>: its lift_fresh is no upload
        probe = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if probe.on:
                    name = func.overloadpacket.__name__
                    if name == "lift_fresh" and probe._scalar_setitem:
                        pass
                    elif name in SYNC_ATEN:
                        probe.records.append((f"aten.{name}", _where()))
                    elif name in ("_to_copy", "copy_") and _to_host(name, args, kwargs):
                        probe.records.append((f"aten.{name} to the host", _where()))
                return func(*args, **kwargs)

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if probe.on:
                    name = SYNC_METHODS.get(func)
                    if name is not None:
                        probe.records.append((name, _where()))
                if func is _T.__setitem__ and len(args) == 3 and isinstance(args[2], (bool, int, float)):
                    probe._scalar_setitem += 1
                    try:
                        return func(*args, **kwargs)
                    finally:
                        probe._scalar_setitem -= 1
                return func(*args, **kwargs)

        self._modes = (Function, Dispatch)

    @contextmanager
    def installed(self):
        """Install both modes (recording only while :attr:`on`)."""
        fn, disp = self._modes
        with fn(), disp():
            yield self

    @contextmanager
    def recording(self):
        """Install the modes and record everything inside."""
        with self.installed():
            self.on = True
            try:
                yield self
            finally:
                self.on = False


def _to_host(name: str, args, kwargs) -> bool:
    if name == "_to_copy":
        dev = kwargs.get("device")
        return dev is not None and torch.device(dev).type == "cpu" and args[0].device.type != "cpu"
    dst, src = args[0], args[1]
    return isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu"

