"""The fused sampler step in Triton: one kernel executes any plan row (see ``fastdiff.plan``).

Three layers, Liger-Kernel style:

1. ``_step_kernel`` (``@triton.jit``): a program owns ``BLOCK`` consecutive elements of one sample,
   laid out as ``[BLOCK // 4, 4]`` so that the four elements of one Philox group (which share one
   Philox call) sit in one row. Storage is loaded ``.to(float32)`` (float64 for float64 storage).
2. ``_launch``: flattens to ``[B, n]`` and launches on the current device. The block size is
   ``INTERPRET_BLOCK`` under ``TRITON_INTERPRET=1``; on a GPU a fixed configuration per size class
   (:func:`fixed_config`: BLOCK and num_warps from ``n``, the dtype and the batch; no tuning runs,
   nothing synchronises), or, opt-in with ``FASTDIFF_TRITON_AUTOTUNE=1``, autotuned at the first
   launch of each shape and variant (the trial runs restore every output and synchronise: run one
   step eagerly before timing or capturing a CUDA graph; ``0`` or unset means fixed). After a
   variant's first launch the compiled kernel is launched directly (``DIRECT``; see ``_launch``).
3. ``fused_step``: the public wrapper over plain tensors and the packed coefficient tuple
   (``launch_flags`` + ``launch``: the checks and flags once, then launches, for prepared programs).

``philox_words`` dumps the raw uint32 Philox stream of the in-kernel generator, for tests.

Packed coefficients: ``fastdiff.args.N_COEF`` (30) float64 values in the layout of
``fastdiff.args.pack_row`` (offsets ``C_*`` there; this module imports them, it keeps no copy),
passed as one pointer to a float64 device tensor (``coef_ptr``) that the kernel loads from::

    a_x, a_e, out[8], write0[8], write1[8], known_a, known_s, c_g, u_scale

with each 8-vector over the operands ``[x, d, e, h0, h1, h2, h3, z]`` (``fastdiff.plan``; ``e``: the
guided model output, after rescale and the gradient term ``e += c_g * g``, before clipping touches
``d``). Besides ``x'`` and the history writes, a row may write the next model input
``u[c*u_stride + i] = u_scale * x'_stored[i]`` for ``c < U_COPIES`` (``x'`` rounded to the storage
type first, as torch's ``x' * in_scale``) and set ``flag[0] = 1`` where an element of ``m``,
``m_c``, ``m_2`` or ``m_3`` is NaN or Inf (never 0; no host sync).

A prepared program keeps one such table for all its rows (:class:`CoefTable`, a row's view per
launch); the unprepared path (``fused_step``) takes its row from a small cache keyed by the
coefficients (:func:`coef_tensor`). The compile-time flags that depend on coefficient values (which
terms exist: ``E_OUT``, ``E_WR0``, ``E_WR1``, ``Z_MODE``, ``Z2_MODE``) are still decided on the host,
from the tuple.

Blend mode (``BLEND``; the float32 ``[4, B]`` or ``[8, B]`` per-sample coefficients ``a`` given, no
``w``/``r``): ``e = a[0] m + a[1] (m_c - m) + a[2] (m_2 - m) + a[3] m_3`` (each term where its branch
is given, in that order), and with ``m_w`` also ``m_w = `` the same combination under ``a[4..8)``,
stored after every input is read (``m_w`` may be ``m_3`` itself). The kernel knows nothing of the
sampler or guider that chose the coefficients.
"""

from __future__ import annotations

import array
import functools
import inspect
import os
from functools import reduce
from operator import attrgetter, or_

import torch
import triton
import triton.language as tl

from fastdiff.args import BLEND_ROWS as _BLEND_ROWS
from fastdiff.args import C_AE, C_AX, C_G, C_KNOWN_A, C_KNOWN_S, C_OUT, C_U, C_W0, C_W1, N_COEF
from fastdiff.plan import MAX_READS, MAX_WRITES, N_OPERANDS, OP_D, OP_E, OP_H, OP_X, OP_Z

MAX_BATCH = 65535
"""Largest batch: the sample index is grid axis 1, which CUDA limits to 65535."""

INTERPRET_BLOCK = 128
"""Elements per program under ``TRITON_INTERPRET=1`` (no autotuning there)."""
GPU_BLOCKS = (512, 1024, 2048, 4096)
"""Block sizes the opt-in GPU autotuner (``FASTDIFF_TRITON_AUTOTUNE=1``) tries; :func:`fixed_config`
picks among them otherwise."""

_Z_NONE, _Z_PHILOX, _Z_EXTERNAL = 0, 1, 2
_BR: tl.constexpr = tl.constexpr(_BLEND_ROWS)  # rows of a per combination (fastdiff.args.BLEND_ROWS)
# The packed layout's offsets as the kernel's compile-time constants (the values are fastdiff.args'
# and fastdiff.plan's; a jitted function reads only constexpr globals).
_C_AX: tl.constexpr = tl.constexpr(C_AX)
_C_AE: tl.constexpr = tl.constexpr(C_AE)
_C_OUT: tl.constexpr = tl.constexpr(C_OUT)
_C_W0: tl.constexpr = tl.constexpr(C_W0)
_C_W1: tl.constexpr = tl.constexpr(C_W1)
_C_KNOWN_A: tl.constexpr = tl.constexpr(C_KNOWN_A)
_C_KNOWN_S: tl.constexpr = tl.constexpr(C_KNOWN_S)
_C_G: tl.constexpr = tl.constexpr(C_G)
_C_U: tl.constexpr = tl.constexpr(C_U)
_OP_X: tl.constexpr = tl.constexpr(OP_X)
_OP_D: tl.constexpr = tl.constexpr(OP_D)
_OP_E: tl.constexpr = tl.constexpr(OP_E)
_OP_H: tl.constexpr = tl.constexpr(OP_H)
_OP_Z: tl.constexpr = tl.constexpr(OP_Z)
_STREAM_MAIN, _STREAM_KNOWN = 0, 1


# --------------------------------------------------------------------------------------------
# Layer 1: the kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (the round function and key schedule of ``fastdiff.rng``)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _philox_group(g, seed, row, STREAM: tl.constexpr):
    """The 4 uint32 words of group ``g`` (int64 tensor) of one sample keyed by ``seed`` (int64)."""
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((g >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = (tl.zeros_like(c0) + row).to(tl.uint32)
    c3 = tl.zeros_like(c0) + STREAM
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def _uniform01(u):
    # ((u >> 9) * 2 + 1) < 2**24, so the float conversion and the scaling are exact.
    return ((u >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _box_muller(ua, ub):
    r = tl.sqrt_rn(-2.0 * tl.log(_uniform01(ua)))
    theta = _uniform01(ub) * 6.283185307179586
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _philox_normal(g, k, seed, row, STREAM: tl.constexpr):
    """float32 normals for elements ``4*g + k`` (``g``: [G, 1] int64, ``k``: [1, 4])."""
    u0, u1, u2, u3 = _philox_group(g, seed, row, STREAM)
    n0, n1 = _box_muller(u0, u1)
    n2, n3 = _box_muller(u2, u3)
    return tl.where(k == 0, n0, tl.where(k == 1, n1, tl.where(k == 2, n2, n3)))


@triton.jit
def _to_storage(v, ST: tl.constexpr):
    """Round ``v`` to the storage type ``ST`` to nearest even (bf16 by hand: the Triton
    interpreter truncates on a plain cast, hardware rounds; this is exact in both)."""
    if ST == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ST)


@triton.jit
def _nonfinite(v, CDT: tl.constexpr):
    """Whether ``v`` (in the compute type) is NaN or Inf: its exponent bits are all ones (on the
    bits, so no floating-point folding or fast-math setting can drop the test)."""
    if CDT == tl.float64:
        return (v.to(tl.uint64, bitcast=True) & 0x7FF0000000000000) == 0x7FF0000000000000
    else:
        return (v.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _coef(coef_ptr, OFF: tl.constexpr, CDT: tl.constexpr):
    """Packed coefficient ``OFF`` (float64) rounded to the compute type, as the reference rounds it."""
    return tl.load(coef_ptr + OFF).to(CDT)


@triton.jit
def _combine(x, d, e, h0, h1, h2, h3, z, coef_ptr, BASE: tl.constexpr,
             HAS_E: tl.constexpr, N_READS: tl.constexpr, HAS_Z: tl.constexpr, CDT: tl.constexpr):
    """``cx*x + cd*d + ce*e + sum_k ck*hk + cz*z`` in the reference's order of operations, with the
    8 coefficients at ``coef_ptr + BASE + OP_*`` (``HAS_E``: ``ce`` is non-zero in the compute type,
    decided by the launcher; coefficients of absent terms are not loaded)."""
    acc = _coef(coef_ptr, BASE + _OP_X, CDT) * x + _coef(coef_ptr, BASE + _OP_D, CDT) * d
    if HAS_E:
        acc = acc + _coef(coef_ptr, BASE + _OP_E, CDT) * e
    if N_READS > 0:
        acc = acc + _coef(coef_ptr, BASE + _OP_H, CDT) * h0
    if N_READS > 1:
        acc = acc + _coef(coef_ptr, BASE + _OP_H + 1, CDT) * h1
    if N_READS > 2:
        acc = acc + _coef(coef_ptr, BASE + _OP_H + 2, CDT) * h2
    if N_READS > 3:
        acc = acc + _coef(coef_ptr, BASE + _OP_H + 3, CDT) * h3
    if HAS_Z:
        acc = acc + _coef(coef_ptr, BASE + _OP_Z, CDT) * z
    return acc


@triton.jit
def _blend(m, mc_ptr, m2_ptr, m3_ptr, a_ptr, offs, inb, b, nb, bad,
           HAS_C: tl.constexpr, HAS_M2: tl.constexpr, HAS_M3: tl.constexpr, HAS_MW: tl.constexpr,
           CHECK: tl.constexpr, CDT: tl.constexpr):
    """Blend mode: ``(e, e_w, bad)`` with ``e = a[0] m + a[1] (m_c - m) + a[2] (m_2 - m) + a[3] m_3``
    (each term where its branch is given, in that order: the reference's), ``e_w`` the same under
    ``a[4..8)`` with ``HAS_MW`` (else ``m``, unused), and ``bad`` also covering the branches read.
    ``a`` is float32 ``[4 or 8, nb]`` (``BLEND_ROWS`` = 4 per combination), row ``k`` of sample ``b``
    at ``a_ptr + k * nb + b``."""
    e = tl.load(a_ptr + b).to(CDT) * m
    e_w = m
    if HAS_MW:
        e_w = tl.load(a_ptr + _BR * nb + b).to(CDT) * m
    if HAS_C:
        mc = tl.load(mc_ptr + offs, mask=inb, other=0.0).to(CDT)
        if CHECK:
            bad = bad | _nonfinite(mc, CDT)
        dc = mc - m
        e = e + tl.load(a_ptr + nb + b).to(CDT) * dc
        if HAS_MW:
            e_w = e_w + tl.load(a_ptr + (_BR + 1) * nb + b).to(CDT) * dc
    if HAS_M2:
        m2 = tl.load(m2_ptr + offs, mask=inb, other=0.0).to(CDT)
        if CHECK:
            bad = bad | _nonfinite(m2, CDT)
        d2 = m2 - m
        e = e + tl.load(a_ptr + 2 * nb + b).to(CDT) * d2
        if HAS_MW:
            e_w = e_w + tl.load(a_ptr + (_BR + 2) * nb + b).to(CDT) * d2
    if HAS_M3:
        m3 = tl.load(m3_ptr + offs, mask=inb, other=0.0).to(CDT)
        if CHECK:
            bad = bad | _nonfinite(m3, CDT)
        e = e + tl.load(a_ptr + 3 * nb + b).to(CDT) * m3
        if HAS_MW:
            e_w = e_w + tl.load(a_ptr + (_BR + 3) * nb + b).to(CDT) * m3
    return e, e_w, bad


@triton.jit(do_not_specialize=["row"])
def _step_kernel(
    x_ptr, out_ptr, m_ptr, mc_ptr,
    h0_ptr, h1_ptr, h2_ptr, h3_ptr, wr0_ptr, wr1_ptr,
    z_ptr, z2_ptr, mask_ptr, known_ptr, g_ptr,
    w_ptr, r_ptr, s_ptr, seed_ptr, u_ptr, flag_ptr,
    m2_ptr, m3_ptr, a_ptr, mw_ptr, coef_ptr,
    n, row, u_stride,
    HAS_CFG: tl.constexpr, HAS_R: tl.constexpr, HAS_G: tl.constexpr, CLIP: tl.constexpr,
    N_READS: tl.constexpr, N_WRITES: tl.constexpr, HAS_MASK: tl.constexpr,
    E_OUT: tl.constexpr, E_WR0: tl.constexpr, E_WR1: tl.constexpr,
    Z_MODE: tl.constexpr, Z2_MODE: tl.constexpr, U_COPIES: tl.constexpr, CHECK: tl.constexpr,
    BLEND: tl.constexpr, HAS_M2: tl.constexpr, HAS_M3: tl.constexpr, HAS_MW: tl.constexpr,
    CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    """One plan row over elements ``[pid0*BLOCK, (pid0+1)*BLOCK)`` of sample ``pid1``.

    Every element tensor is contiguous ``[B, n]``; ``u`` holds ``U_COPIES`` (0, 1 or 2) such
    ``[B, n]`` blocks, ``u_stride`` elements apart (``u_stride`` is the full batch's numel when the
    launcher runs a slice of it). ``flag`` (int32, one element) is set to 1 with ``CHECK`` where an
    ``m``/``m_c``/``m_2``/``m_3`` element of this block is non-finite. With ``BLEND`` (``HAS_CFG``:
    ``m_c`` given; no ``HAS_R``), ``a`` is a contiguous float32 ``[4 or 8, B]`` tensor (``B`` the
    grid's axis 1: the launcher passes the slice it runs) and ``e`` is the blend of the branches given
    (``HAS_M2``, ``HAS_M3``); ``HAS_MW`` also writes the blend under rows 4..7 to ``m_w``. ``*_ptr``
    not selected by the constexpr flags are never read (the launcher passes ``x`` for them). All loads
    precede all stores, so outputs may alias inputs element for element. ``coef_ptr`` points at the
    row's ``N_COEF`` packed float64 coefficients (``fastdiff.args.pack_row``'s layout), each loaded
    where used and rounded to the compute type (as a float64 scalar argument was before).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    G: tl.constexpr = BLOCK // 4
    g = (pid * G + tl.arange(0, G)).to(tl.int64)[:, None]  # Philox group within the sample
    k = tl.arange(0, 4)[None, :]
    j = g * 4 + k  # element within the sample
    inb = j < n
    offs = b * n + j

    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(CDT)
    e = tl.load(m_ptr + offs, mask=inb, other=0.0).to(CDT)
    if CHECK:  # masked-off lanes load 0: finite
        bad = _nonfinite(e, CDT)
    else:
        bad = inb  # unused
    if BLEND:
        e, e_w, bad = _blend(e, mc_ptr, m2_ptr, m3_ptr, a_ptr, offs, inb, b, tl.num_programs(1).to(tl.int64), bad,
                             HAS_CFG, HAS_M2, HAS_M3, HAS_MW, CHECK, CDT)
    else:
        if HAS_CFG:
            w = tl.load(w_ptr + b).to(CDT)
            mc = tl.load(mc_ptr + offs, mask=inb, other=0.0).to(CDT)
            if CHECK:
                bad = bad | _nonfinite(mc, CDT)
            e = e + w * (mc - e)
        if HAS_R:
            e = tl.load(r_ptr + b).to(CDT) * e
    if HAS_G:
        e = e + _coef(coef_ptr, _C_G, CDT) * tl.load(g_ptr + offs, mask=inb, other=0.0).to(CDT)
    # e stays the unclipped (guided) model output: the combinations below may use it too
    d = _coef(coef_ptr, _C_AX, CDT) * x + _coef(coef_ptr, _C_AE, CDT) * e
    if CLIP > 0:
        s = tl.load(s_ptr + b).to(CDT)
        d = tl.minimum(tl.maximum(d, -s), s)
        if CLIP == 2:
            if CDT == tl.float32:
                d = tl.div_rn(d, tl.zeros_like(d) + s)  # IEEE division, as torch does
            else:
                d = d / s

    h0 = x
    h1 = x
    h2 = x
    h3 = x
    if N_READS > 0:
        h0 = tl.load(h0_ptr + offs, mask=inb, other=0.0).to(CDT)
    if N_READS > 1:
        h1 = tl.load(h1_ptr + offs, mask=inb, other=0.0).to(CDT)
    if N_READS > 2:
        h2 = tl.load(h2_ptr + offs, mask=inb, other=0.0).to(CDT)
    if N_READS > 3:
        h3 = tl.load(h3_ptr + offs, mask=inb, other=0.0).to(CDT)

    if Z_MODE == 2:
        z = tl.load(z_ptr + offs, mask=inb, other=0.0).to(CDT)
    elif Z_MODE == 1:
        seed = tl.load(seed_ptr + b)
        z = _philox_normal(g, k, seed, row, 0).to(CDT)
    else:
        z = x

    if HAS_MASK:
        mk = tl.load(mask_ptr + offs, mask=inb, other=0.0).to(CDT)
        known = _coef(coef_ptr, _C_KNOWN_A, CDT) * tl.load(known_ptr + offs, mask=inb, other=0.0).to(CDT)
        if Z2_MODE == 2:
            z2 = tl.load(z2_ptr + offs, mask=inb, other=0.0).to(CDT)
            known = known + _coef(coef_ptr, _C_KNOWN_S, CDT) * z2
        elif Z2_MODE == 1:
            seed2 = tl.load(seed_ptr + b)
            z2 = _philox_normal(g, k, seed2, row, 1).to(CDT)
            known = known + _coef(coef_ptr, _C_KNOWN_S, CDT) * z2

    # every input of these elements has been read; outputs may alias them from here on
    new_x = _combine(x, d, e, h0, h1, h2, h3, z, coef_ptr, _C_OUT,
                     E_OUT, N_READS, Z_MODE > 0, CDT)
    if HAS_MASK:
        new_x = mk * new_x + (1.0 - mk) * known
    if N_WRITES > 0:
        v0 = _combine(x, d, e, h0, h1, h2, h3, z, coef_ptr, _C_W0,
                      E_WR0, N_READS, Z_MODE > 0, CDT)
    if N_WRITES > 1:
        v1 = _combine(x, d, e, h0, h1, h2, h3, z, coef_ptr, _C_W1,
                      E_WR1, N_READS, Z_MODE > 0, CDT)
    x_st = _to_storage(new_x, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, x_st, mask=inb)
    if N_WRITES > 0:
        tl.store(wr0_ptr + offs, _to_storage(v0, wr0_ptr.dtype.element_ty), mask=inb)
    if N_WRITES > 1:
        tl.store(wr1_ptr + offs, _to_storage(v1, wr1_ptr.dtype.element_ty), mask=inb)
    if BLEND:
        if HAS_MW:  # last: m_w may be m_3 (read above), the momentum buffer updated in place
            tl.store(mw_ptr + offs, _to_storage(e_w, mw_ptr.dtype.element_ty), mask=inb)
    if U_COPIES > 0:
        # the next model input from x' as stored (no read back: the rounded value is in registers),
        # times u_scale in the compute type, rounded to storage: torch's x' * in_scale
        u = _to_storage(x_st.to(CDT) * _coef(coef_ptr, _C_U, CDT), u_ptr.dtype.element_ty)
        tl.store(u_ptr + offs, u, mask=inb)
        if U_COPIES > 1:
            tl.store(u_ptr + u_stride + offs, u, mask=inb)
    if CHECK:
        # one atomic per block that saw a non-finite element (only ever 1 is written, so the
        # stores of concurrent programs commute); no atomic at all on clean data
        any_bad = tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0)
        tl.atomic_max(flag_ptr, 1, mask=any_bad > 0, sem="relaxed")


@triton.jit(do_not_specialize=["row"])
def _philox_words_kernel(seed_ptr, out_ptr, n_groups, row, STREAM: tl.constexpr, G: tl.constexpr):
    """Raw Philox words of groups ``[pid0*G, ...)`` of sample ``pid1`` into int64 ``[B, 4*n_groups]``."""
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    g = pid * G + tl.arange(0, G).to(tl.int64)
    ok = g < n_groups
    seed = tl.load(seed_ptr + b)
    u0, u1, u2, u3 = _philox_group(g, seed, row, STREAM)
    base = out_ptr + b * n_groups * 4 + g * 4
    tl.store(base + 0, u0.to(tl.int64), mask=ok)
    tl.store(base + 1, u1.to(tl.int64), mask=ok)
    tl.store(base + 2, u2.to(tl.int64), mask=ok)
    tl.store(base + 3, u3.to(tl.int64), mask=ok)


# --------------------------------------------------------------------------------------------
# Layer 2: the launcher
# --------------------------------------------------------------------------------------------


def _interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old or very new triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(fn, InterpretedFunction)


INTERPRETED = _interpreted(_step_kernel)
"""Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (decided once, at import)."""


_PARAMS = tuple(inspect.signature(getattr(_step_kernel, "fn", _step_kernel)).parameters)
_N_PTRS = _PARAMS.index("n")
"""The kernel's pointer parameters come first (``coef_ptr`` last of them), then ``n, row, u_stride``,
then the constexpr flags in :func:`launch_flags`' order, then ``BLOCK``."""
_FLAG_NAMES = _PARAMS[_N_PTRS + 3:-1]

_OUTPUTS = ["out_ptr", "wr0_ptr", "wr1_ptr", "u_ptr", "flag_ptr", "mw_ptr"]
_TUNE_KEY = ["n", "HAS_CFG", "HAS_R", "HAS_G", "CLIP", "N_READS", "N_WRITES", "HAS_MASK", "E_OUT", "E_WR0", "E_WR1",
             "Z_MODE", "Z2_MODE", "U_COPIES", "CHECK", "BLEND", "HAS_M2", "HAS_M3", "HAS_MW"]

if INTERPRETED:
    _tuned = None
else:
    # Opt-in (FASTDIFF_TRITON_AUTOTUNE=1). Outputs may alias inputs (in-place x, history slots read
    # and written), so every trial run restores them; tuning happens once per shape and variant.
    _tuned = triton.autotune(
        configs=[triton.Config({"BLOCK": blk}, num_warps=4 if blk <= 1024 else 8) for blk in GPU_BLOCKS],
        key=_TUNE_KEY,
        restore_value=_OUTPUTS,
    )(_step_kernel)

_CDT = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32, torch.float64: tl.float64}
STORAGE_DTYPES = tuple(_CDT)
"""Storage dtypes the kernel handles."""


# --- fixed launch configuration (the GPU default) ----------------------------------------------

FIXED_WAVES = 4
"""Programs per SM the fixed configuration aims for at least (see :func:`fixed_config`)."""


def fixed_config(n: int, batch: int, dtype: torch.dtype, sms: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` on a GPU of ``sms`` SMs for ``batch`` samples of ``n`` elements of ``dtype``
    (the default; no tuning runs, one compile per variant and size class).

    The step is memory-bound: what matters is enough bytes in flight and little per-program overhead
    (index math, the row's coefficient loads, the Philox key). So:

    * the largest block first: 4096 elements for 2-byte storage, 2048 for fp32, 1024 for fp64 (so a
      thread of ``num_warps`` warps handles 16 elements of 2 or 4 bytes, or 8 of fp64 computed in
      float64: 16-byte vector accesses, bounded registers);
    * halved (down to 512) while the grid ``batch * ceil(n / BLOCK)`` has fewer than
      ``FIXED_WAVES * sms`` programs, so that a small step still occupies every SM several times over;
    * never far above the sample: a block does not span samples, so ``BLOCK <= max(128, next_pow2(n))``;
    * ``num_warps`` 4 up to 1024 elements, 8 above (the autotuner's pairs, ``GPU_BLOCKS``).
    """
    size = torch.empty((), dtype=dtype).element_size()
    blk = 4096 if size <= 2 else 2048 if size == 4 else 1024
    while blk > 512 and batch * triton.cdiv(n, blk) < FIXED_WAVES * sms:
        blk //= 2
    blk = min(blk, max(128, triton.next_power_of_2(n)))
    return blk, 4 if blk <= 1024 else 8


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _autotune() -> bool:
    """Whether launches autotune (``FASTDIFF_TRITON_AUTOTUNE=1``, read per first launch of a variant)."""
    return os.environ.get("FASTDIFF_TRITON_AUTOTUNE", "0") == "1"


# --- the coefficient tensors --------------------------------------------------------------------

COEF_CACHE_SIZE = 256
"""Coefficient rows kept on the device for the unprepared path (:func:`coef_tensor`)."""
_coef_cache: dict[tuple, torch.Tensor] = {}


def _host_coef(coef) -> torch.Tensor:
    """The packed float64 coefficients as a CPU tensor (pinned when CUDA is up: an asynchronous copy)."""
    t = torch.tensor(array.array("d", coef), dtype=torch.float64)
    return t.pin_memory() if torch.cuda.is_available() else t


def _no_capture(device: torch.device, what: str) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} would upload coefficients while a CUDA graph is being captured (the copy would "
                           "not be recorded); run the loop once eagerly before capturing it")


def coef_tensor(coef, device: torch.device) -> torch.Tensor:
    """A float64 ``[N_COEF]`` tensor of the packed coefficients ``coef`` on ``device``, for the unprepared path.

    Kept in a small cache keyed by the coefficients' bits and the device (``COEF_CACHE_SIZE`` rows,
    oldest dropped first), so that a loop calling :func:`fused_step` with the same rows uploads each
    row once; a prepared program keeps its own table instead. An upload is an asynchronous copy
    ordered on the current stream, and is refused (``RuntimeError``) during CUDA graph capture.
    """
    key = (array.array("d", coef).tobytes(), device)
    t = _coef_cache.get(key)
    if t is None:
        _no_capture(device, "this step's row is new, so it")
        t = _host_coef(coef).to(device, non_blocking=True)
        if len(_coef_cache) >= COEF_CACHE_SIZE:
            del _coef_cache[next(iter(_coef_cache))]
        _coef_cache[key] = t
    return t


class CoefTable:
    """One device float64 tensor ``[n_rows, N_COEF]``: the coefficient rows of a prepared program.

    ``row(i)`` is row ``i``'s ``[N_COEF]`` view (16-byte aligned: a row is 240 bytes), what the kernel
    takes; ``write(i, coef)`` rewrites it when the row's coefficients change, an asynchronous copy on
    the current stream (so steps already queued read the old values), refused during CUDA graph
    capture. A captured graph reads the table, so a row rewritten later is seen by its replays.
    """

    def __init__(self, rows: list, device: torch.device) -> None:
        _no_capture(device, "preparing a program")
        self._bits = [array.array("d", c).tobytes() for c in rows]
        host = _host_coef([v for c in rows for v in c]).view(len(rows), N_COEF) if rows else \
            torch.empty(0, N_COEF, dtype=torch.float64)
        self.table = host.to(device, non_blocking=True)
        self._rows = list(self.table.unbind(0))

    def row(self, i: int) -> torch.Tensor:
        """Row ``i``'s coefficients (a view of the table)."""
        return self._rows[i]

    def write(self, i: int, coef) -> torch.Tensor:
        """Row ``i``'s coefficients set to ``coef`` (uploaded only where they differ); returns its view."""
        bits = array.array("d", coef).tobytes()
        if bits != self._bits[i]:
            _no_capture(self.table.device, f"coefficient row {i} changed, so its rewrite")
            self._rows[i].copy_(_host_coef(coef), non_blocking=True)
            self._bits[i] = bits
        return self._rows[i]


# --- the launch -----------------------------------------------------------------------------------


def _direct_supported() -> bool:
    """Whether the installed Triton launches as this module's direct path assumes (decided once).

    ``JITFunction.run`` of Triton 3.x ends in ``kernel.run(grid_0, grid_1, grid_2, stream,
    kernel.function, kernel.packed_metadata, launch_metadata, enter_hook, exit_hook, *bound_args.values())``
    with every parameter's value in order (the launcher skips the constexprs by the compiled
    signature). Where its source says otherwise the normal launch is used throughout.
    ``FASTDIFF_TRITON_DIRECT=0`` turns the direct path off."""
    if INTERPRETED or os.environ.get("FASTDIFF_TRITON_DIRECT", "1") == "0":
        return False
    try:
        from triton.runtime.jit import JITFunction

        src = inspect.getsource(JITFunction.run)
    except (ImportError, OSError, TypeError, AttributeError):
        return False
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)  # where _launch_hooks looks (Triton >= 3.4)
    return hasattr(knobs, "launch_enter_hook") and all(s in src for s in (
        "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,",
        "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())", "return kernel"))


DIRECT = _direct_supported()
"""Whether the compiled kernel is launched directly after a variant's first launch (see :func:`_launch`)."""
_direct: dict[tuple, tuple] = {}
"""``key -> (run, function, packed_metadata, grid0, BLOCK)``: compiled kernels by :func:`_launch`'s key."""


def _stream(index: int) -> int:
    """The current CUDA stream of device ``index`` (Triton's own choice, ``driver.active.get_current_stream``)."""
    return torch._C._cuda_getCurrentRawStream(index)


def _launch_hooks() -> bool:
    """Whether a Triton launch hook (a profiler's) is set: such launches take the normal path, which
    builds the hooks' launch metadata (Triton 3.9's hooks are chains, empty when unused)."""
    rt = triton.knobs.runtime
    enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True)) or (exit_ is not None and getattr(exit_, "calls", True)))


def _launch(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, u_stride, flag, row, coef_t,
            flags, m_2=None, m_3=None, a=None, m_w=None):
    """Launch on the tensors given (``coef_t``: the row's float64 ``[N_COEF]`` tensor, ``flags`` in
    :func:`launch_flags`' order).

    The first launch of a variant (its flags, shape, dtypes, pointer alignment and device) goes
    through Triton's ``JITFunction.run`` (compiling, or autotuning with ``FASTDIFF_TRITON_AUTOTUNE=1``,
    which is read there: a variant launched before keeps its configuration), which returns the
    compiled kernel; with :data:`DIRECT` that kernel and its grid are kept, and later launches of the
    same key call its launcher directly, skipping Triton's argument binder, cache key and the
    autotuner's key lookup. The key re-derives per call what Triton specialises on: every pointer's
    dtype and 16-byte alignment, the integers' values (``n`` and ``u_stride`` themselves, so ``== 1``
    and divisibility by 16 are covered; ``row``'s 32-bit range).
    """
    b = x.shape[0]
    n = x.numel() // b
    if n == 0:
        return
    ptrs = _pointers(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, flag, m_2, m_3, a,
                     m_w, coef_t)
    row = int(row) & 0xFFFFFFFF
    u_stride = int(u_stride)
    fv = tuple(flags.values())
    if DIRECT:
        dev = x.device.index
        addrs = tuple(map(_DATA_PTR, ptrs))
        key = _direct_key(addrs, ptrs, fv, n, b, u_stride, row, dev)
        hit = _direct.get(key)
        if hit is not None and dev == _current_device() and not _launch_hooks():
            run, function, metadata, grid0, blk = hit
            # the addresses as integers: the launcher then neither calls data_ptr nor queries the driver
            run(grid0, b, 1, _stream(dev), function, metadata, None, None, None, *addrs, n, row, u_stride, *fv, blk)
            return
    with _on_device(x):
        compiled, grid0, blk = _launch_jit(ptrs, n, b, row, u_stride, flags, x.dtype)
    if DIRECT and compiled is not None:
        try:  # (.run first: it loads the binary, which sets .function)
            _direct[key] = (compiled.run, compiled.function, compiled.packed_metadata, grid0, blk)
        except AttributeError:  # not the CompiledKernel this path expects: keep launching normally
            pass


_M, _MC = 2, 3
"""Where ``m`` and ``m_c`` sit in the kernel's pointer parameters (:func:`_pointers`)."""


def _pointers(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, flag, m_2, m_3, a, m_w,
              coef_t) -> tuple:
    """The kernel's pointer arguments in its parameter order (``x`` for an operand not given: never read)."""
    reads = list(h_read) + [x] * (MAX_READS - len(h_read))
    writes = list(h_write) + [x] * (MAX_WRITES - len(h_write))

    def vec(t):  # per-sample scalars: tiny, so make any view (an expanded scalar) contiguous
        return x if t is None else t.contiguous()

    return (x, out, m, x if m_c is None else m_c, *reads, *writes,
            x if z is None else z, x if z2 is None else z2,
            x if mask is None else mask, x if known is None else known, x if g is None else g,
            vec(w), vec(r), vec(s), vec(seeds), x if u is None else u, x if flag is None else flag,
            x if m_2 is None else m_2, x if m_3 is None else m_3, vec(a), x if m_w is None else m_w, coef_t)


def _direct_key(addrs, ptrs, fv, n, b, u_stride, row, dev) -> tuple:
    """What Triton specialises a launch on, re-derived: the flags, the integers' values (``n`` and
    ``u_stride`` themselves, so ``== 1`` and divisibility by 16 are covered; ``row``'s 32-bit range),
    every pointer's 16-byte alignment (one OR over the addresses where all are aligned) and dtype."""
    align = True if reduce(or_, addrs) & 15 == 0 else tuple(p & 15 == 0 for p in addrs)
    return fv, n, b, u_stride, row > 0x7FFFFFFF, align, tuple(map(_DTYPE, ptrs)), dev


def direct_launcher(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, u_stride, flag, row,
                    coef_t, flags, m_2=None, m_3=None, a=None, m_w=None):
    """``launch(m) -> bool`` for a row whose variant has been launched (the same arguments as :func:`launch`),
    or ``None`` where the direct path does not apply (no :data:`DIRECT`, not launched yet, a per-sample
    operand that is not contiguous, an empty state).

    Every pointer but the model output's is fixed when this is made: ``launch(m)`` takes the whole
    model output (``[m; m_c]`` back to back for a guided row, ``m`` alone otherwise, as
    :meth:`fastdiff.runtime.ops.Program.run` does), checks that it has the dtype and the alignment this
    variant was compiled for, that the device is current and no launch hook is set, and launches:
    ``False`` (nothing launched) where a check fails. The caller keeps the row's tensors unchanged
    while it uses the launcher (a prepared program drops it when an operand is pointed elsewhere)."""
    if not DIRECT:
        return None
    b = x.shape[0]
    n = x.numel() // b
    if n == 0:
        return None
    if any(t is not None and not t.is_contiguous() for t in (w, r, s, seeds, a)):
        return None  # (a contiguous copy per launch: its address would not stay)
    ptrs = _pointers(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, flag, m_2, m_3, a,
                     m_w, coef_t)
    row = int(row) & 0xFFFFFFFF
    u_stride = int(u_stride)
    fv = tuple(flags.values())
    dev = x.device.index
    addrs = tuple(map(_DATA_PTR, ptrs))
    hit = _direct.get(_direct_key(addrs, ptrs, fv, n, b, u_stride, row, dev))
    if hit is None:
        return None
    run, function, metadata, grid0, blk = hit
    head, tail = addrs[:_M], addrs[_MC + 1:]
    m_dtype = m.dtype
    guided = m_c is not None
    if guided and m_c.dtype != m_dtype:
        return None
    off = x.numel() * m.element_size() if guided else 0  # m_c = model output[B:]
    need = ((addrs[_M] & 15) == 0, (addrs[_MC] & 15) == 0)  # the alignment compiled for (Triton's specialisation)
    keep = ptrs  # the tensors behind the addresses stay alive with the launcher
    ints = (n, row, u_stride, *fv, blk)

    def launch(mo: torch.Tensor) -> bool:
        if mo.dtype != m_dtype or dev != _current_device() or _launch_hooks():
            return False
        pm = mo.data_ptr()
        pc = pm + off if guided else head[0]  # (m_c's slot holds x when the row is not guided)
        if ((pm & 15) == 0, (pc & 15) == 0) != need:
            return False
        run(grid0, b, 1, _stream(dev), function, metadata, None, None, None, *head, pm, pc, *tail, *ints)
        return keep is not None

    return launch


_DATA_PTR = torch.Tensor.data_ptr
_DTYPE = attrgetter("dtype")


def _current_device() -> int:
    return torch.cuda.current_device()


def _launch_jit(ptrs, n, b, row, u_stride, flags, dtype) -> tuple[object, int, int]:
    """One launch through Triton's ``JITFunction.run`` (or the autotuner's): ``(its return value, the
    compiled kernel on a GPU; grid axis 0; BLOCK)``."""
    if not INTERPRETED and _autotune():
        compiled = _tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]), b)](*ptrs, n, row, u_stride, **flags)
        blk = _tuned.best_config.kwargs["BLOCK"]
        return compiled, triton.cdiv(n, blk), blk
    if INTERPRETED:
        blk, opts = INTERPRET_BLOCK, {}
    else:
        blk, nw = fixed_config(n, b, dtype, _sm_count(_current_device()))
        opts = {"num_warps": nw}
    grid0 = triton.cdiv(n, blk)
    return _step_kernel[(grid0, b)](*ptrs, n, row, u_stride, **flags, BLOCK=blk, **opts), grid0, blk


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _on_device(t: torch.Tensor):
    # torch.cuda.device only when needed: `with torch.device(...)` would push a TorchFunctionMode
    # that slows every tensor access of Triton's launcher (~10x the launch cost).
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _nullcontext()


# --------------------------------------------------------------------------------------------
# Layer 3: the wrappers
# --------------------------------------------------------------------------------------------


def fused_step(
    x: torch.Tensor,
    out: torch.Tensor,
    m: torch.Tensor,
    coef,
    *,
    row: int = 0,
    m_c: torch.Tensor | None = None,
    h_read=(),
    h_write=(),
    w: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    clip: int = 0,
    seeds: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    z2: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    flag: torch.Tensor | None = None,
    m_2: torch.Tensor | None = None,
    m_3: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    m_w: torch.Tensor | None = None,
) -> None:
    """Execute one plan row in one kernel launch; writes ``out``, ``h_write``, ``u``, ``flag`` and
    ``m_w`` in place.

    Args:
        x, out, m, m_c, h_read[k], h_write[j], z, z2, mask, known, g: contiguous tensors shaped like
            ``x`` (``[B, ...]``, ``B <= 65535``), one storage dtype (fp16, bf16, fp32, fp64), one
            device. ``out`` and ``h_write`` may be the same tensors as inputs (in-place).
        coef: ``fastdiff.args.N_COEF`` (30) floats, the layout of ``fastdiff.args.pack_row``.
        row: the Philox counter word of this plan row.
        w, r, s: float32 ``[B]`` guidance scale (with ``m_c``), rescale factor, clip bound.
        clip: 0 none, 1 clamp to ``±s``, 2 clamp and divide by ``s``.
        seeds: int64 ``[B]`` Philox keys, used for ``z``/``z2`` when those are ``None``.
        g: classifier-guidance gradient: ``e += c_g * g`` (even where ``c_g`` is 0, as the reference).
        u: the next model input, ``u_scale * x'`` (``x'`` as stored, ``u_scale = coef[C_U]``) written
            ``k`` = 1 or 2 times: a contiguous ``[k*B, ...]`` tensor (the copies back to back), or a
            ``[k, B, ...]`` view whose copies are each contiguous, ``u.stride(0)`` elements apart
            (``u_all.view(k, B_all, ...)[:, lo:hi]``: a slice of a larger batch's ``u``).
            x's dtype and device; may overlap no other tensor.
        flag: int32 tensor of one element, set to 1 where an element of ``m``, ``m_c``, ``m_2`` or
            ``m_3`` is NaN or Inf (never cleared here; no host sync).
        a: float32 ``[4, B]`` (``[8, B]`` with ``m_w``) blend coefficients, or a view of such rows
            (made contiguous here): given, the row blends ``m``, ``m_c``, ``m_2``, ``m_3`` (those given)
            into ``e`` instead of ``w``/``r`` (which must then be ``None``). ``m_2``, ``m_3``: further
            branches shaped like ``x``; ``m_w``: the second combination's output (may be ``m_3``).

    The caller validates shapes and dtypes (``fastdiff.ops.validate``); this checks only what the
    kernel itself relies on.
    """
    flags, u_stride = launch_flags(x, out, m, coef, m_c=m_c, h_read=h_read, h_write=h_write, w=w, r=r, s=s,
                                   clip=clip, seeds=seeds, z=z, z2=z2, mask=mask, known=known, g=g, u=u, flag=flag,
                                   m_2=m_2, m_3=m_3, a=a, m_w=m_w)
    _launch(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, u_stride, flag, row,
            coef_tensor(coef, x.device), flags, m_2, m_3, a, m_w)


def launch_flags(x, out, m, coef, *, m_c=None, h_read=(), h_write=(), w=None, r=None, s=None, clip=0, seeds=None,
                 z=None, z2=None, mask=None, known=None, g=None, u=None, flag=None, m_2=None, m_3=None, a=None,
                 m_w=None) -> tuple[dict, int]:
    """``(flags, u_stride)``: the kernel's compile-time flags for this row and the stride between the
    copies of ``u``, after the checks :func:`fused_step` makes (its arguments, its errors). A prepared
    program computes them once per row and launches with :func:`launch` after that."""
    if len(coef) != N_COEF:
        raise ValueError(f"coef must have {N_COEF} entries, got {len(coef)}")
    if len(h_read) > MAX_READS or len(h_write) > MAX_WRITES:
        raise ValueError(f"at most {MAX_READS} reads and {MAX_WRITES} writes, got {len(h_read)} and {len(h_write)}")
    if x.dtype not in _CDT:
        raise TypeError(f"x has dtype {x.dtype}; the Triton step supports {STORAGE_DTYPES}")
    if clip not in (0, 1, 2):
        raise ValueError(f"clip must be 0, 1 or 2, got {clip!r}")
    if x.dim() < 1 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(f"x must have a batch dimension of 1..{MAX_BATCH}, got shape {tuple(x.shape)}")
    for name, t in _tensors(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, m_2, m_3, m_w):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)})")
    u_copies, u_stride = _check_u(x, u)
    if flag is not None and (flag.dtype != torch.int32 or flag.numel() != 1 or flag.device != x.device):
        raise ValueError(f"flag must be an int32 tensor of one element on {x.device}, got {flag.dtype} "
                         f"{tuple(flag.shape)} on {flag.device}")
    nw = len(h_write)
    cdt = _CDT[x.dtype]
    need_z = coef[C_OUT + OP_Z] != 0 or any(coef[C_W0 + N_OPERANDS * j + OP_Z] != 0 for j in range(nw))
    need_z2 = mask is not None and coef[C_KNOWN_S] != 0
    # whether each combination has an e term: on the coefficient rounded to the compute type, as
    # the reference decides (a float64 coefficient below float32's range is no e term in float32)
    e_terms = [_nonzero(coef[c + OP_E], cdt) for c in (C_OUT, C_W0, C_W1)]
    for name, need, ext in (("z", need_z, z), ("z2", need_z2, z2)):
        if need and ext is None and seeds is None:
            raise ValueError(f"this row uses noise {name}: give seeds (Philox) or an external {name} tensor")
    blend = a is not None
    if blend:
        rows = 2 * _BLEND_ROWS if m_w is not None else _BLEND_ROWS
        if a.dtype != torch.float32 or a.device != x.device or tuple(a.shape) != (rows, x.shape[0]):
            raise ValueError(f"a must be a float32 tensor of shape ({rows}, {x.shape[0]}) on {x.device}, got "
                             f"{a.dtype} {tuple(a.shape)} on {a.device}")
        if w is not None or r is not None:
            raise ValueError("w and r cannot be given with a (a blend row's coefficients replace them)")
    else:
        for name, t in (("m_2", m_2), ("m_3", m_3), ("m_w", m_w)):
            if t is not None:
                raise ValueError(f"{name} was given without the blend coefficients a")
    if m_c is not None and w is None and not blend:
        raise ValueError("m_c was given without the guidance scale w")
    if clip and s is None:
        raise ValueError(f"clip={clip} needs the clip bound s")
    if mask is not None and known is None:
        raise ValueError("mask was given without known")
    flags = dict(
        HAS_CFG=m_c is not None,
        HAS_R=r is not None,
        HAS_G=g is not None,
        CLIP=int(clip),
        N_READS=len(h_read),
        N_WRITES=nw,
        HAS_MASK=mask is not None,
        E_OUT=e_terms[0],
        E_WR0=nw > 0 and e_terms[1],
        E_WR1=nw > 1 and e_terms[2],
        Z_MODE=(_Z_EXTERNAL if z is not None else _Z_PHILOX) if need_z else _Z_NONE,
        Z2_MODE=(_Z_EXTERNAL if z2 is not None else _Z_PHILOX) if need_z2 else _Z_NONE,
        U_COPIES=u_copies,
        CHECK=flag is not None,
        BLEND=blend,
        HAS_M2=m_2 is not None,
        HAS_M3=m_3 is not None,
        HAS_MW=m_w is not None,
        CDT=cdt,
    )
    return {k: flags[k] for k in _FLAG_NAMES}, u_stride  # the kernel's parameter order (the direct launch's)


def launch(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, u_stride, flag, row, coef_t,
           flags, m_2=None, m_3=None, a=None, m_w=None) -> None:
    """One row's launch with the ``flags`` and ``u_stride`` :func:`launch_flags` gave for tensors of the same
    presence, layout and coefficients, ``coef_t`` those coefficients as a float64 ``[N_COEF]`` tensor on
    ``x``'s device (a :class:`CoefTable` row, or :func:`coef_tensor`'s); nothing is checked here."""
    _launch(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g, w, r, s, seeds, u, u_stride, flag, row, coef_t,
            flags, m_2, m_3, a, m_w)


def _check_u(x: torch.Tensor, u: torch.Tensor | None) -> tuple[int, int]:
    """``(copies, stride between copies in elements)`` of the model-input tensor ``u`` (``(0, 0)``
    without one); raises ``ValueError`` naming ``u`` unless its copies are contiguous ``x``-shaped blocks."""
    if u is None:
        return 0, 0
    b, rest = x.shape[0], tuple(x.shape[1:])
    if u.dtype != x.dtype or u.device != x.device:
        raise ValueError(f"u must have x's dtype {x.dtype} and device {x.device}, got {u.dtype} on {u.device}")
    if u.dim() == x.dim() and u.shape[0] in (b, 2 * b) and tuple(u.shape[1:]) == rest:
        if not u.is_contiguous():
            raise ValueError(f"u must be contiguous (got strides {u.stride()} for shape {tuple(u.shape)})")
        return u.shape[0] // b, x.numel()
    if u.dim() == x.dim() + 1 and u.shape[0] in (1, 2) and tuple(u.shape[1:]) == tuple(x.shape):
        if not u[0].is_contiguous():
            raise ValueError(f"each copy u[c] must be contiguous (got strides {u.stride()} for shape {tuple(u.shape)})")
        if u.shape[0] == 2 and u.stride(0) < x.numel():
            raise ValueError(f"the copies of u overlap: stride {u.stride(0)} between copies of {x.numel()} elements")
        return u.shape[0], u.stride(0) if u.shape[0] == 2 else x.numel()
    raise ValueError(f"u must have shape ({b}, ...) or ({2 * b}, ...) with x's trailing shape {rest}, or "
                     f"(k, *x.shape) with k = 1 or 2, got {tuple(u.shape)}")


def _nonzero(c: float, cdt) -> bool:
    """Whether the coefficient ``c`` is non-zero once rounded to the compute type ``cdt``."""
    if cdt == tl.float32:
        return array.array("f", (c,))[0] != 0.0
    return c != 0.0


def _tensors(x, out, m, m_c, h_read, h_write, z, z2, mask, known, g=None, m_2=None, m_3=None, m_w=None):
    named = [("x", x), ("out", out), ("m", m), ("m_c", m_c), ("z", z), ("z2", z2), ("mask", mask), ("known", known),
             ("g", g), ("m_2", m_2), ("m_3", m_3), ("m_w", m_w)]
    named += [(f"h_read[{i}]", h) for i, h in enumerate(h_read)]
    named += [(f"h_write[{i}]", h) for i, h in enumerate(h_write)]
    return [(name, t) for name, t in named if t is not None]


def philox_words(seeds: torch.Tensor, row: int, stream: int, numel: int) -> torch.Tensor:
    """The in-kernel Philox uint32 stream as int64, shape ``[B, ceil(numel/4)*4]``.

    Same layout as ``fastdiff.rng.philox_bits``; ``seeds`` is int64 ``[B]`` on the kernel's device.
    """
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(f"seeds must be a 1-D int64 tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
    if stream not in (_STREAM_MAIN, _STREAM_KNOWN):
        raise ValueError(f"stream must be 0 or 1, got {stream!r}")
    b = seeds.shape[0]
    groups = (numel + 3) // 4
    out = torch.empty((b, groups * 4), dtype=torch.int64, device=seeds.device)
    if groups == 0 or b == 0:
        return out
    gblk = 32 if INTERPRETED else 256
    with _on_device(seeds):
        _philox_words_kernel[(triton.cdiv(groups, gblk), b)](
            seeds.contiguous(), out, groups, int(row) & 0xFFFFFFFF, STREAM=stream, G=gblk)
    return out
