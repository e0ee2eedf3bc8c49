"""The per-sample statistics a guider's blend coefficients are computed from: one pass over the
guidance branches giving, per sample, their Gram matrix (all dot products) and their sums.

Every data-dependent guider in diffusers (CFG-Zero*'s optimal scale, APG's projection and norm
threshold, tangential CFG's singular vectors, magnitude-aware guidance's ratio, the guidance-rescale
standard deviations) is a function of these few numbers per sample, because each blends its
branches linearly: ``pred = sum_k p_k[b] M_k``. So one reduction replaces the chain of eager
norms, projections and SVDs, and the blend itself runs inside the fused step.

On CPU tensors the compiled extension accumulates in float64 in one pass (``_C.gram``) into numpy
arrays, and the guider's few ``[B]`` operations then run in numpy (a microsecond or less each,
where a torch op on a tiny tensor costs several: they are most of a small row's host time);
elsewhere (CUDA tensors, and the reference path) everything is torch, in float64, on the branches'
device (no host sync). The formulas are written once, over :attr:`Stats.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.args import BLEND_ROWS


def device_constant(values, device, dtype=torch.float64) -> torch.Tensor:
    """Host numbers (a list, or a list of lists) as a tensor on ``device`` made by fills, not copied from
    the host: on a GPU, ``torch.tensor(values, device=...)`` uploads pageable memory and waits for the
    stream (a host sync every row), a fill takes its number as a kernel argument."""
    shape = np.shape(values)
    t = torch.zeros(shape, dtype=dtype, device=device)
    flat = t.view(-1)
    for i, v in enumerate(np.ravel(np.asarray(values, dtype=np.float64))):
        if v != 0.0:
            flat[i] = float(v)
    return t


class TorchOps:
    """The array functions a blend's weights are computed with, for torch tensors (float64)."""

    sqrt, exp, where, minimum, ones_like = torch.sqrt, torch.exp, torch.where, torch.minimum, torch.ones_like

    @staticmethod
    def clamp_min(v, lo: float):
        return v.clamp_min(lo)

    @staticmethod
    def zeros(b: int, like) -> torch.Tensor:
        """``[b, 4]`` zeros on ``like``'s device."""
        return torch.zeros(b, 4, dtype=torch.float64, device=like.device)

    @staticmethod
    def array(values, like) -> torch.Tensor:
        """Host numbers as a float64 tensor on ``like``'s device (:func:`device_constant`)."""
        return device_constant(values, like.device, torch.float64)

    @staticmethod
    def as_float(mask):
        return mask.to(torch.float64)

    @staticmethod
    def copy(v):
        return v.clone()

    @staticmethod
    def cat(parts):
        return torch.cat(parts)


class NumpyOps:
    """:class:`TorchOps` for numpy arrays (the CPU extension's statistics)."""

    sqrt, exp, where, minimum, ones_like = np.sqrt, np.exp, np.where, np.minimum, np.ones_like

    @staticmethod
    def clamp_min(v, lo: float):
        return np.maximum(v, lo)

    @staticmethod
    def zeros(b: int, like) -> np.ndarray:
        return np.zeros((b, 4))

    @staticmethod
    def array(values, like) -> np.ndarray:
        return np.array(values, dtype=np.float64)

    @staticmethod
    def as_float(mask):
        return mask.astype(np.float64)

    @staticmethod
    def copy(v):
        return v.copy()

    @staticmethod
    def cat(parts):
        return np.concatenate(parts)


def ops_of(a) -> type:
    """:class:`NumpyOps` for a numpy array, else :class:`TorchOps`."""
    return NumpyOps if isinstance(a, np.ndarray) else TorchOps


@dataclass(frozen=True)
class Stats:
    """Per-sample statistics of the (up to ``BLEND_ROWS``) branch slots ``m, m_c, m_2, m_3``.

    Attributes:
        gram: float64 ``[B, 4, 4]``: ``gram[b, i, j] = <M_i[b], M_j[b]>``; rows and columns of absent
            slots are 0. A numpy array (the CPU extension's) or a torch tensor.
        sums: float64 ``[B, 4]``: the sum of each slot's elements per sample (0 for absent slots).
        n: elements per sample.
    """

    gram: torch.Tensor | np.ndarray
    sums: torch.Tensor | np.ndarray
    n: int

    @property
    def ops(self) -> type:
        """The array functions for these statistics' kind (:class:`NumpyOps` or :class:`TorchOps`)."""
        return ops_of(self.gram)

    def quad(self, p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """``<sum_i p_i M_i, sum_j q_j M_j>`` per sample, for plain coefficient vectors ``p``, ``q``
        (float64 ``[B, 4]``; ``q`` defaults to ``p``)."""
        q = p if q is None else q
        return (p[:, :, None] * self.gram * q[:, None, :]).sum((1, 2))

    def std(self, p: torch.Tensor) -> torch.Tensor:
        """The (Bessel-corrected, as ``torch.std``) standard deviation over each sample's elements of
        ``sum_i p_i M_i``, float64 ``[B]``."""
        n = self.n
        mean_sq = (p * self.sums).sum(1) ** 2 / n
        ops = self.ops
        return ops.sqrt(ops.clamp_min(self.quad(p) - mean_sq, 0.0) / max(n - 1, 1))


def gram(slots: list[torch.Tensor | None], extension: bool = True) -> Stats:
    """:class:`Stats` of the branch ``slots`` (``[m, m_c, m_2, m_3]``, ``None`` where absent; each
    ``[B, ...]``, one shape). The CPU extension's one pass where it can (``extension``), else torch."""
    present = [t for t in slots if t is not None]
    ref = present[0]
    b = ref.shape[0]
    n = ref[0].numel() if ref.dim() else 1
    k = len(slots)
    ext = _extension(present) if extension and n > 0 else None  # (no elements: torch's zeros below)
    if ext is not None:
        g = np.zeros((b, BLEND_ROWS, BLEND_ROWS))
        s = np.zeros((b, BLEND_ROWS))
        ptrs = [0 if t is None else t.data_ptr() for t in slots] + [0] * (BLEND_ROWS - k)
        ext._C.gram(ptrs, ref.numel(), n, ext.DTYPE_CODES[ref.dtype], g.ctypes.data, s.ctypes.data)
        return Stats(g, s, n)
    x = torch.zeros(b, BLEND_ROWS, n, dtype=torch.float64, device=ref.device)
    for i, t in enumerate(slots):
        if t is not None:
            x[:, i] = t.reshape(b, n).to(torch.float64)
    return Stats(torch.bmm(x, x.transpose(1, 2)), x.sum(-1), n)


def _extension(tensors: list[torch.Tensor]):
    """The CPU backend module if its extension has ``gram`` and every tensor is a contiguous CPU
    tensor of one supported dtype, else ``None``."""
    from ..backends import cpu

    if cpu._C is None or not hasattr(cpu._C, "gram"):
        return None
    dt = tensors[0].dtype
    if dt not in cpu.DTYPE_CODES or not all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == dt
                                            for t in tensors):
        return None
    return cpu
