"""Random plan rows covering every feature of the step, shared by the backend tests.

``check(run, feat, shape, dtype, device)`` runs ``reference`` and a backend (``run(args)``) on
identical fresh inputs, with outputs that alias no input poisoned with NaN, and compares.
"""

from __future__ import annotations

import torch

from fastdiff.runtime import ops
from fastdiff.core.args import C_G, C_OUT, C_U, C_W0, N_COEF, StepArgs, pack_row
from fastdiff.backends import reference
from fastdiff.core.plan import MAX_WRITES, N_OPERANDS, OP_E, OP_Z, Row, combo

SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**63 + 12345, 2**64 - 1, 0x0123456789ABCDEF]
"""Philox keys worth testing, as unsigned 64-bit words (``rng._signed64`` maps them to int64)."""


def tolerance(dtype: torch.dtype, noise: bool) -> float:
    """‖a−b‖/‖b‖ allowed: fp32 1e-6; fp16/bf16 one storage rounding (unit roundoff); fp64 near exact,
    except that the normals are float32 by specification (only equal to float32 rounding)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(dtype).eps / 2
    if dtype == torch.float64 and not noise:
        return 1e-12
    return 1e-6


def build(feat: dict, shape: tuple[int, ...], dtype: torch.dtype, seed: int, device):
    """Random inputs for one row with the features ``feat``.

    Returns ``(pool, make_args, outputs)``: ``pool`` maps names to tensors (outputs that alias no
    input are NaN-poisoned), ``make_args(pool)`` builds ``StepArgs`` over a pool (so that a cloned
    pool keeps the aliasing), ``outputs`` names the pool entries the step writes.
    """
    g = torch.Generator().manual_seed(seed)
    b = shape[0]

    def rnd(*s):
        return torch.randn(*s, generator=g)

    def field():
        return rnd(*shape).to(dtype).to(device)

    n_reads = feat.get("reads", 0)
    writes = feat.get("writes", ())
    noise = feat.get("noise")  # None | "philox" | "external" | "write_only"
    mask = feat.get("mask")  # None | "plain" | "philox" | "external"
    e_in = feat.get("e")  # None | "out" | "writes" | "all": combinations with a non-zero e coefficient
    g_mode = feat.get("g")  # None | "random" | "zero" (c_g = 0, g still given) | "x" (g is x itself)
    u_copies = feat.get("u", 0)  # 0 | 1 | 2: copies of the next model input the step writes
    bad = feat.get("nonfinite")  # None | "m" | "m_c" | "m_inf" | "m_c_inf": one such element in that input
    pool = {"x": field(), "m": field()}
    if g_mode in ("random", "zero"):
        pool["g"] = field()
    for k in range(n_reads):
        pool[f"h{k}"] = field()
    if feat.get("cfg"):
        pool["m_c"] = field()
    if noise == "external":
        pool["z"] = field()
    if mask:
        pool["mask"] = (torch.rand(*shape, generator=g) > 0.5).to(dtype).to(device)
        pool["known"] = field()
        if mask == "external":
            pool["z2"] = field()
    if bad:
        key = bad.removesuffix("_inf")
        flat = pool[key].view(-1)
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = float("inf") if bad.endswith("_inf") else float(
            "nan")
    if u_copies:
        pool["u"] = torch.full((u_copies * shape[0], *shape[1:]), float("nan"), dtype=dtype, device=device)
    if feat.get("flag"):
        pool["flag"] = torch.zeros(1, dtype=torch.int32, device=device)
    out_key = "x" if feat.get("in_place") else "out"
    if out_key == "out":
        pool["out"] = torch.full(shape, float("nan"), dtype=dtype, device=device)
    write_keys = []
    for j, target in enumerate(writes):  # "new", "x" or "h<k>" (a slot this row also reads)
        key = f"wr{j}" if target == "new" else target
        if target == "new":
            pool[key] = torch.full(shape, float("nan"), dtype=dtype, device=device)
        write_keys.append(key)

    def vec(use_e):  # random coefficient vector; entries of unread slots are garbage the kernel must ignore
        v = rnd(N_OPERANDS).double()
        if noise is None or noise == "write_only":
            v[OP_Z] = 0.0
        if not use_e:
            v[OP_E] = 0.0
        return v.tolist()

    out_c = vec(e_in in ("out", "all"))
    # unused write slots: garbage, e and z included
    w_c = [vec(e_in in ("writes", "all")) for _ in writes] + [rnd(N_OPERANDS).double().tolist()] * (2 - len(writes))
    if noise == "write_only":
        w_c[0][OP_Z] = 0.7
    if noise is None:
        for c in w_c:
            c[OP_Z] = 0.0
    row = int(torch.randint(0, 2**32, (1,), generator=g))
    known_s = 0.0 if mask in (None, "plain") else float(rnd(1))
    c_g = 0.0 if g_mode == "zero" else float(rnd(1))  # garbage without g
    u_scale = float(rnd(1)) if feat.get("u_scale") is None else feat["u_scale"]
    coef = (float(rnd(1)), float(rnd(1)), *out_c, *w_c[0], *w_c[1], float(rnd(1)), known_s, c_g, u_scale)
    assert len(coef) == N_COEF and coef[C_G] == c_g and coef[C_OUT + OP_E] == out_c[OP_E] and coef[C_U] == u_scale
    assert all(coef[C_W0 + N_OPERANDS * j + OP_Z] == w_c[j][OP_Z] for j in range(MAX_WRITES))
    scal = {
        "w": (rnd(b).abs() * 6).to(device),
        "r": (rnd(b).abs() + 0.5).to(device),
        "s": (rnd(b).abs() + 0.5).to(device),
        "seeds": torch.randint(-(2**63), 2**63 - 1, (b,), generator=g).to(device),
    }

    def make_args(p):
        return StepArgs(
            x=p["x"], out=p[out_key], m=p["m"], coef=coef, row=row,
            m_c=p.get("m_c"), h_read=tuple(p[f"h{k}"] for k in range(n_reads)),
            h_write=tuple(p[k] for k in write_keys), w=scal["w"] if feat.get("cfg") else None,
            r=scal["r"] if feat.get("rescale") else None, s=scal["s"] if feat.get("clip") else None,
            clip=feat.get("clip", 0), seeds=scal["seeds"], z=p.get("z"), z2=p.get("z2"),
            mask=p.get("mask"), known=p.get("known"), g=p["x"] if g_mode == "x" else p.get("g"),
            u=p.get("u"), flag=p.get("flag"),
        )

    return pool, make_args, [out_key, *write_keys] + [k for k in ("u", "flag") if k in pool]


def check(run, feat: dict, shape, dtype: torch.dtype, device, seed: int = 0) -> None:
    """``run(args)`` (the backend under test) equals ``reference`` on the row ``feat``."""
    pool, make_args, outputs = build(feat, shape, dtype, seed, device)
    ref = {k: v.clone() for k, v in pool.items()}
    got = {k: v.clone() for k, v in pool.items()}
    a_ref, a_got = make_args(ref), make_args(got)
    ops.validate(a_got)
    reference.step(a_ref)
    run(a_got)
    compare_to_reference(got, ref, pool, outputs, feat, shape, dtype, bool(feat.get("nonfinite")))


def compare_to_reference(got: dict, ref: dict, pool: dict, outputs: list, feat: dict, shape, dtype: torch.dtype,
                         nonfinite: bool) -> None:
    """Every tensor of a row run by the backend under test (``got``) against the reference run (``ref``),
    both started from copies of ``pool``: outputs within the row's tolerance (and rounded as torch
    rounds in fp16/bf16), non-finite where the reference is (``nonfinite`` rows), the flag exact,
    and inputs untouched."""
    noise = bool(feat.get("noise")) or feat.get("mask") in ("philox", "external")
    tol = tolerance(dtype, noise)
    for k in pool:
        if k == "flag":  # exact: 1 where a model output element read is non-finite, else left 0
            want = 1 if nonfinite else 0
            assert got[k].tolist() == ref[k].tolist() == [want], f"flag {got[k].tolist()} (reference {ref[k].tolist()})"
            continue
        a, b = got[k].double(), ref[k].double()
        if nonfinite and k in outputs:  # NaN/Inf flow into the results: where, not how much
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{k}: non-finite elements differ"
            continue
        if k in outputs:
            assert torch.isfinite(a).all(), f"{k}: the kernel left poisoned or non-finite values"
            err = ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()
            assert err <= tol, f"{k}: relative error {err:.3g} > {tol:.3g} ({dtype}, shape {shape}, {feat})"
            if dtype in (torch.float16, torch.bfloat16):
                check_rounding(k, got[k], ref[k])
        else:
            same = (got[k] == pool[k]) | (got[k].isnan() & pool[k].isnan())
            assert same.all(), f"input {k} was modified"


def check_tiny_e_coefficient(run, device) -> None:
    """The reference decides "c_e != 0" on the coefficient rounded to the compute type: 1e-50 is no
    e term in float32 (and for fp16/bf16 storage). Seen in the sign of a zero: x' = -x - d = -0
    stays -0 without the term and becomes +0 with 0 * e added; in float64 the term is there."""
    row = Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.0, a_e=0.0, out=combo(x=-1.0, d=-1.0, e=1e-50))
    for dtype in (torch.float32, torch.float16, torch.float64):
        x = torch.zeros(2, 8, dtype=dtype, device=device)
        out, want = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        args = StepArgs(x=x, out=out, m=torch.ones_like(x), coef=pack_row(row))
        run(args)
        reference.step(StepArgs(**{**args.__dict__, "out": want}))
        assert torch.equal(out, want) and torch.equal(out.signbit(), want.signbit()), (dtype, out[0, 0].item())
        assert out.signbit().all() if dtype != torch.float64 else (out == 1e-50).all(), dtype


def check_rounding(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Both sides round nearly the same float32 value: they may differ only where that value sits
    at a rounding boundary (rare), and then by one ulp of the storage type, plus the float32
    arithmetic error at the tensor's scale (FMA contraction on a GPU; it matters only near 0,
    after cancellation). A truncating or double-rounding store fails."""
    n_differ = int((a != b).sum())
    assert n_differ <= 1 + a.numel() // 100, f"{name}: {n_differ} of {a.numel()} elements differ"
    fi = torch.finfo(b.dtype)
    bd = b.double()
    ulp = (fi.eps * torch.exp2(torch.floor(torch.log2(bd.abs().clamp_min(fi.tiny))))).clamp_min(fi.tiny * fi.eps)
    slack = 1e-6 * bd.abs().max()
    bad = (a.double() - bd).abs() > ulp + slack
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements differ by more than one ulp, e.g. "
                           f"{a[bad][:3].tolist()} vs {b[bad][:3].tolist()}")


FEATURES = {
    "plain": {},
    "cfg": {"cfg": True},
    "cfg_rescale": {"cfg": True, "rescale": True},
    "static_clip": {"clip": 1},
    "dynamic_clip": {"clip": 2, "cfg": True},
    "mask_no_known_noise": {"mask": "plain"},
    "mask_philox_known_noise": {"mask": "philox", "noise": "philox"},
    "mask_external_known_noise": {"mask": "external"},
    "reads1_write_new": {"reads": 1, "writes": ("new",)},
    "reads2_write_read": {"reads": 2, "writes": ("h1",)},
    "reads3_writes2": {"reads": 3, "writes": ("h0", "new")},
    "reads4_writes_read_and_x": {"reads": 4, "writes": ("h3", "x"), "noise": "philox"},
    "writes2_no_reads": {"writes": ("new", "new")},
    "philox_noise": {"noise": "philox", "reads": 1, "writes": ("h0",)},
    "external_noise": {"noise": "external", "writes": ("new",)},
    "noise_in_write_only": {"noise": "write_only", "writes": ("new",)},
    # the model output e as an operand, next to a clipped d (diffusers' DDIM default), CFG, rescale
    "e_all_reads2": {"e": "all", "reads": 2, "writes": ("h1", "new")},
    "e_out_only_cfg": {"e": "out", "cfg": True, "reads": 1, "writes": ("new",)},
    "e_writes_only": {"e": "writes", "reads": 1, "writes": ("h0", "new")},
    "e_static_clip_cfg": {"e": "all", "clip": 1, "cfg": True, "writes": ("new",)},
    "e_dynamic_clip_cfg_rescale": {"e": "out", "clip": 2, "cfg": True, "rescale": True, "reads": 1},
    "e_philox_noise": {"e": "all", "noise": "philox", "reads": 1, "writes": ("new",)},
    # the gradient term e += c_g * g
    "g": {"g": "random"},
    "g_zero_coef_e": {"g": "zero", "e": "all", "reads": 1},
    "g_is_x_in_place_e": {"g": "x", "in_place": True, "e": "out", "writes": ("new",)},
    "g_cfg_rescale_clip_e": {"g": "random", "e": "all", "cfg": True, "rescale": True, "clip": 1, "reads": 2,
                             "writes": ("h1", "new")},
    "in_place_everything": {"in_place": True, "cfg": True, "rescale": True, "clip": 2, "reads": 4,
                            "writes": ("h0", "h2"), "mask": "philox", "noise": "philox", "e": "all", "g": "random",
                            "u": 2, "flag": True},
    # the next model input written by the step (contract v3), and the non-finite flag
    "u1": {"u": 1},
    "u1_scale_one_in_place": {"u": 1, "u_scale": 1.0, "in_place": True, "reads": 1, "writes": ("h0",)},
    "u2_cfg_multistep": {"u": 2, "cfg": True, "reads": 1, "writes": ("new",), "flag": True},
    "u2_ancestral": {"u": 2, "cfg": True, "noise": "philox", "in_place": True, "flag": True},
    "u2_mask_external": {"u": 2, "cfg": True, "mask": "external", "noise": "external", "flag": True},
    "flag_plain": {"flag": True},
    "flag_nan_m": {"flag": True, "nonfinite": "m", "u": 1},
    "flag_inf_m": {"flag": True, "nonfinite": "m_inf"},
    "flag_nan_uncond_half": {"flag": True, "cfg": True, "nonfinite": "m", "u": 2},
    "flag_inf_cond_half": {"flag": True, "cfg": True, "nonfinite": "m_c_inf", "reads": 2, "writes": ("h1",)},
}
EVERYTHING = {"cfg": True, "rescale": True, "clip": 2, "reads": 4, "writes": ("h1", "new"), "mask": "philox",
              "noise": "philox", "e": "all", "g": "random", "u": 2, "flag": True}
"""Every feature at once, out of place (tests add ``in_place=True``)."""


def run_unaligned(args, run, vector_path) -> None:
    """Run ``run(a)`` on a copy of the row whose element tensors sit one element past a 16-byte
    boundary (so kernels must take their scalar path: ``vector_path(pointers)`` is asserted
    False), then copy every result back into the original tensors (aliases stay aliases)."""
    from fastdiff.core.args import StepArgs
    from fastdiff.backends import cuda as cb

    moved = {}

    def shift(t):
        if t is None:
            return None
        if id(t) not in moved:
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
            moved[id(t)] = (t, buf[1:].view(t.shape))
            moved[id(t)][1].copy_(t)
        return moved[id(t)][1]

    a = StepArgs(x=shift(args.x), out=shift(args.out), m=shift(args.m), coef=args.coef, row=args.row,
                 m_c=shift(args.m_c), h_read=tuple(shift(h) for h in args.h_read),
                 h_write=tuple(shift(h) for h in args.h_write), w=args.w, r=args.r, s=args.s, clip=args.clip,
                 seeds=args.seeds, z=shift(args.z), z2=shift(args.z2), mask=shift(args.mask),
                 known=shift(args.known), g=shift(args.g), u=shift(args.u), flag=args.flag)
    assert not vector_path(cb.pointers(a))
    run(a)
    for orig, copy in moved.values():
        orig.copy_(copy)


def triton_kernels():
    """``(fastdiff.kernels.step, device)`` for a Triton test module, skipping the whole module where the
    kernels cannot run: triton or its kernels do not import, or they were imported compiled
    (without ``TRITON_INTERPRET=1``, which tests/backends/conftest.py sets) on a machine with no GPU.
    The device is ``cpu`` under the interpreter, else ``cuda``. Call at module level."""
    import pytest

    pytest.importorskip("triton", reason="triton is not installed")
    from fastdiff.backends import triton as tb

    if isinstance(tb._kernels, Exception):
        pytest.skip(f"triton kernels do not import: {tb._kernels}", allow_module_level=True)
    k = tb.kernels()
    if not k.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("fastdiff.kernels.step was imported without TRITON_INTERPRET=1 and there is no GPU "
                    "(run the tests from the repository so tests/backends/conftest.py sets it)",
                    allow_module_level=True)
    return k, "cpu" if k.INTERPRETED else "cuda"
