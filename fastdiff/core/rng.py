"""Counter-based noise: Philox4x32-10 and Box–Muller in plain torch (the reference stream).

Element ``j`` of sample ``b`` at plan row ``row`` and noise stream ``stream`` is::

    key     = (seed[b] & 0xFFFFFFFF, seed[b] >> 32)
    counter = (g & 0xFFFFFFFF, g >> 32, row, stream)      with g = j // 4
    u0..u3  = philox4x32_10(counter, key)
    f(u)    = ((u >> 9) * 2 + 1) * 2**-24                  # exact float32 in (0, 1)
    n0, n1  = sqrt(-2 ln f(u0)) * (cos, sin)(f(u1) * float(2π))
    n2, n3  = sqrt(-2 ln f(u2)) * (cos, sin)(f(u3) * float(2π))
    z       = n[j % 4]

Arithmetic is float32 and fully specified: ``ln``, ``sin`` and ``cos`` are the Cephes polynomials
of ``csrc/philox.h``, written here as the same float32 operations in the same order, none fused
(:func:`log_f32`, :func:`sincos_f32`; the C++ build has ``-ffp-contract=off``, nvcc
``--fmad=false``), and ``sqrt`` is correctly rounded (:func:`sqrt_rn`). torch's own ``log``, ``sin``,
``cos`` and CPU ``sqrt`` round differently from the kernels and from each other across devices.
So the ``reference``, ``cpu`` (every SIMD level) and ``cuda`` backends draw bit-identical normals,
and the uint32 words are bit-identical on every backend. The ``triton`` kernel computes
``ln``/``sin``/``cos`` with libdevice (``__nv_logf``/``__nv_sinf``/``__nv_cosf``, flush-to-zero)
and differs within :data:`TRITON_NORMAL_TOL`.

Noise depends only on (seed, row, stream, element): the same seed gives the same noise at any
batch size and position in the batch, on any device.
"""

from __future__ import annotations

import struct

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
TRITON_NORMAL_TOL = 4 * 2.0**-23
"""The ``triton`` backend's normals ``z'`` differ from this stream's ``z`` by at most
``TRITON_NORMAL_TOL * max(|z|, 1)`` (its libdevice ``logf``/``sinf``/``cosf`` round differently from
the Cephes polynomials). Measured on 16.8M normals through a CPU build of Triton's own libdevice
(tests/test_reproducibility.py): 12% of elements differ, by at most 3 ulp, 7.2e-7 absolute,
2.7 * 2**-23 scaled; tests/backends/test_gpu.py asserts the bound on the GPU."""


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


def _f32(v: float) -> float:
    """``v`` rounded to float32 (a C++ ``F(...f)`` literal), as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


# The float32 constants of csrc/philox.h, each rounded as the C++ literal is.
_SQRT_HALF = _f32(0.707106781186547524)
_LOG_P = tuple(_f32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                 3.3333331174e-1))
_LOG_Q1 = _f32(-2.12194440e-4)
_LOG_Q2 = 0.693359375
_FOUR_OVER_PI = _f32(1.27323954473516)
_DP1, _DP2, _DP3 = 0.78515625, _f32(2.4187564849853515625e-4), _f32(3.77489497744594108e-8)
_COS_P = tuple(_f32(c) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2))
_SIN_P = tuple(_f32(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1))
_TWO_PI_F = _f32(TWO_PI)  # csrc/philox.h's TWO_PI_F
_MANT_MASK = 0x807FFFFF - (1 << 32)  # sign and mantissa bits, as an int32


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 values, bit for bit ``fd_log`` of ``csrc/philox.h``
    (Cephes ``logf``): the same float32 operations in the same order, none fused."""
    b = x.view(torch.int32)
    e = (b >> 23) - 126  # x = m * 2**e with m in [0.5, 1)
    m = ((b & _MANT_MASK) | 0x3F000000).view(torch.float32)
    lt = m < _SQRT_HALF  # then e -= 1, t = 2m - 1; else t = m - 1
    e = e - lt.to(torch.int32)
    t = (m + torch.where(lt, m, 0.0)) - 1.0
    fe = e.to(torch.float32)
    z = t * t
    y = t * _LOG_P[0] + _LOG_P[1]
    for c in _LOG_P[2:]:
        y = y * t + c
    y = y * t * z
    y = y + fe * _LOG_Q1
    y = y - z * 0.5
    r = t + y
    return r + fe * _LOG_Q2


def sincos_f32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sin x, cos x)`` of float32 ``0 <= x < 2**15``, bit for bit ``fd_sincos`` of
    ``csrc/philox.h`` (Cephes ``sinf``/``cosf``, octant reduction by a 3-part Cody–Waite split)."""
    j = (x * _FOUR_OVER_PI).to(torch.int32)  # truncation, as the C++ float -> int32
    j = (j + 1) & -2
    y = j.to(torch.float32)
    x = ((x - y * _DP1) - y * _DP2) - y * _DP3
    neg_s = (j & 4) != 0
    neg_c = ((j - 2) & 4) == 0
    swap = (j & 2) != 0  # the roles of the sin and cos polynomials swap
    z = x * x
    pc = z * _COS_P[0] + _COS_P[1]
    pc = pc * z + _COS_P[2]
    pc = pc * z * z - z * 0.5 + 1.0
    ps = z * _SIN_P[0] + _SIN_P[1]
    ps = ps * z + _SIN_P[2]
    ps = ps * z * x + x
    s = torch.where(swap, pc, ps)
    c = torch.where(swap, ps, pc)
    return torch.where(neg_s, -s, s), torch.where(neg_c, -c, c)  # a sign flip is exact


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root of positive normal float32 values (IEEE ``sqrtf``, as
    the C++ kernels and CUDA's ``sqrt.rn`` compute it). torch's CPU ``sqrt`` need not be (torch
    2.13's AVX-512 kernel misses the last bit for ~15% of inputs), so: the float64 root rounded to
    float32, then moved
    by one ulp where an exact float64 test against the two neighbouring midpoints says so (a
    midpoint has 25 significant bits, its square 50: exact in float64). Devices without float64
    (MPS) fall back to torch's float32 ``sqrt``."""
    if x.device.type == "mps":  # pragma: no cover - no float64 there
        return torch.sqrt(x)
    x64 = x.double()
    s = torch.sqrt(x64).float()
    s64 = s.double()
    up = torch.nextafter(s, torch.full_like(s, float("inf")))
    dn = torch.nextafter(s, torch.zeros_like(s))
    mid_up = (s64 + up.double()) * 0.5
    mid_dn = (s64 + dn.double()) * 0.5
    s = torch.where(mid_up * mid_up < x64, up, s)
    return torch.where(mid_dn * mid_dn > x64, dn, s)


def box_muller(u0: torch.Tensor, u1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normals (float32) from two uint32 words, bit for bit ``fd_box_muller``."""
    r = sqrt_rn(log_f32(uniform01(u0)) * -2.0)
    theta = uniform01(u1) * _TWO_PI_F
    s, c = sincos_f32(theta)
    return r * c, r * s


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
