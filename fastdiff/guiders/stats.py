"""The per-sample statistics a guider's blend coefficients are computed from: one pass over the
guidance branches giving, per sample, their Gram matrix (all dot products) and their sums.

Every data-dependent guider in diffusers (CFG-Zero*'s optimal scale, APG's projection and norm
threshold, tangential CFG's singular vectors, magnitude-aware guidance's ratio, the guidance-rescale
standard deviations) is a function of these few numbers per sample, because each blends its
branches linearly: ``pred = sum_k p_k[b] M_k``. So one reduction replaces the chain of eager
norms, projections and SVDs, and the blend itself runs inside the fused step.

On CPU tensors the compiled extension accumulates in float64 in one pass (``_C.gram``); elsewhere
(and on the reference path) it is torch, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.args import BLEND_ROWS


@dataclass(frozen=True)
class Stats:
    """Per-sample statistics of the (up to ``BLEND_ROWS``) branch slots ``m, m_c, m_2, m_3``.

    Attributes:
        gram: float64 ``[B, 4, 4]``: ``gram[b, i, j] = <M_i[b], M_j[b]>``; rows and columns of absent
            slots are 0.
        sums: float64 ``[B, 4]``: the sum of each slot's elements per sample (0 for absent slots).
        n: elements per sample.
    """

    gram: torch.Tensor
    sums: torch.Tensor
    n: int

    def quad(self, p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """``<sum_i p_i M_i, sum_j q_j M_j>`` per sample, for plain coefficient vectors ``p``, ``q``
        (float64 ``[B, 4]``; ``q`` defaults to ``p``)."""
        q = p if q is None else q
        return torch.einsum("bi,bij,bj->b", p, self.gram, q)

    def std(self, p: torch.Tensor) -> torch.Tensor:
        """The (Bessel-corrected, as ``torch.std``) standard deviation over each sample's elements of
        ``sum_i p_i M_i``, float64 ``[B]``."""
        n = self.n
        mean_sq = (p * self.sums).sum(1) ** 2 / n
        var = (self.quad(p) - mean_sq).clamp_min(0.0) / max(n - 1, 1)
        return var.sqrt()


def gram(slots: list[torch.Tensor | None], extension: bool = True) -> Stats:
    """:class:`Stats` of the branch ``slots`` (``[m, m_c, m_2, m_3]``, ``None`` where absent; each
    ``[B, ...]``, one shape). The CPU extension's one pass where it can (``extension``), else torch."""
    present = [t for t in slots if t is not None]
    ref = present[0]
    b = ref.shape[0]
    n = ref[0].numel() if ref.dim() else 1
    k = len(slots)
    ext = _extension(present) if extension else None
    if ext is not None:
        g = torch.zeros(b, BLEND_ROWS, BLEND_ROWS, dtype=torch.float64)
        s = torch.zeros(b, BLEND_ROWS, dtype=torch.float64)
        ptrs = [0 if t is None else t.data_ptr() for t in slots] + [0] * (BLEND_ROWS - k)
        ext._C.gram(ptrs, ref.numel(), n, ext.DTYPE_CODES[ref.dtype], g.data_ptr(), s.data_ptr())
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
