"""Counter-based noise: Philox4x32-10 and Box–Muller in plain torch (the reference stream).

Every backend reproduces this stream bit for bit (the uint32 words) and to float rounding (the
normals). Element ``j`` of sample ``b`` at plan row ``row`` and noise stream ``stream`` is::

    key     = (seed[b] & 0xFFFFFFFF, seed[b] >> 32)
    counter = (g & 0xFFFFFFFF, g >> 32, row, stream)      with g = j // 4
    u0..u3  = philox4x32_10(counter, key)
    f(u)    = ((u >> 9) * 2 + 1) * 2**-24                  # exact float32 in (0, 1)
    n0, n1  = sqrt(-2 ln f(u0)) * (cos, sin)(2π f(u1))
    n2, n3  = sqrt(-2 ln f(u2)) * (cos, sin)(2π f(u3))
    z       = n[j % 4]

Noise therefore depends only on (seed, row, stream, element): the same seed gives the same
sample at any batch size, position in the batch, device or backend. Arithmetic is float32.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
TWO_PI = 6.283185307179586
STREAM_MAIN = 0
"""Stream of the solver noise ``z``."""
STREAM_KNOWN = 1
"""Stream of the noise ``z2`` that re-noises the known region under a mask."""


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product in int64 without overflow: split b into 16-bit halves.
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    t = a * b_lo
    u = a * b_hi + (t >> 16)
    hi = u >> 16
    lo = ((u & 0xFFFF) << 16) | (t & 0xFFFF)
    return hi & _MASK32, lo & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor], rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable); returns 4 uint32 words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _MASK32 for k in key)
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform01(u: torch.Tensor) -> torch.Tensor:
    """Map uint32 words (int64 tensor) to exact float32 values in (0, 1)."""
    return ((u >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def box_muller(u0: torch.Tensor, u1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normals (float32) from two uint32 words."""
    r = torch.sqrt(-2.0 * torch.log(uniform01(u0)))
    theta = uniform01(u1) * TWO_PI
    return r * torch.cos(theta), r * torch.sin(theta)


def _seed_tensor(seeds, device) -> torch.Tensor:
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device=device, dtype=torch.int64).reshape(-1)
    if isinstance(seeds, int):
        seeds = [seeds]
    return torch.tensor([_signed64(int(v)) for v in seeds], dtype=torch.int64, device=device)


def philox_bits(seeds, row: int, stream: int, numel: int, device=None) -> torch.Tensor:
    """The raw uint32 stream (as int64) per sample: shape ``[B, ceil(numel/4)*4]``."""
    s = _seed_tensor(seeds, device)
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=s.device)[None, :]
    key = (s[:, None] & _MASK32, (s[:, None] >> 32) & _MASK32)
    words = philox4x32((g & _MASK32, g >> 32, torch.full_like(g, row), torch.full_like(g, stream)), key)
    return torch.stack(words, dim=-1).reshape(s.numel(), groups * 4)


def philox_normal(seeds, row: int, stream: int, numel: int, device=None) -> torch.Tensor:
    """Standard normals, float32, shape ``[B, numel]``; sample b is keyed by ``seeds[b]`` alone."""
    s = _seed_tensor(seeds, device)
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=s.device)[None, :]
    key = (s[:, None] & _MASK32, (s[:, None] >> 32) & _MASK32)
    u0, u1, u2, u3 = philox4x32((g & _MASK32, g >> 32, torch.full_like(g, row), torch.full_like(g, stream)), key)
    n0, n1 = box_muller(u0, u1)
    n2, n3 = box_muller(u2, u3)
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(s.numel(), groups * 4)[:, :numel]


def randn(shape, seeds, row: int = 0, stream: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Philox normals shaped ``shape`` (``shape[0]`` = batch, one seed per sample or one int for all).

    An int seed ``s`` for a batch of ``B`` keys sample ``b`` with ``s + b``.
    """
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError("shape must have a batch dimension")
    b = shape[0]
    seeds = expand_seeds(seeds, b)
    n = 1
    for d in shape[1:]:
        n *= d
    return philox_normal(seeds, row, stream, n, device).reshape(shape).to(dtype)


def expand_seeds(seed, batch: int) -> list[int]:
    """One 64-bit seed per sample: an int ``s`` gives ``[s, s+1, ...]``; a sequence must have ``batch`` entries."""
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int or a sequence of ints, got {seed!r}")
    if isinstance(seed, int):
        return [_signed64(seed + i) for i in range(batch)]
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(-1).tolist()
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed has {len(seeds)} entries but the batch has {batch} samples")
    return [_signed64(s) for s in seeds]


def _signed64(s: int) -> int:
    # Seeds are 64-bit words; int64 tensors hold them in two's complement.
    s &= 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s
