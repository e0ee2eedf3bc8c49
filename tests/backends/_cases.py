"""Random plan rows covering every feature of the step, shared by the backend tests.

``check(run, feat, shape, dtype, device)`` runs ``reference`` and a backend (``run(args)``) on
identical fresh inputs, with outputs that alias no input poisoned with NaN, and compares.
"""

from __future__ import annotations

import torch

from fastdiff import ops
from fastdiff.args import StepArgs
from fastdiff.backends import reference
from fastdiff.plan import MAX_READS, N_OPERANDS

ZI = 2 + MAX_READS  # index of z in a coefficient vector
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
    pool = {"x": field(), "m": field()}
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
    out_key = "x" if feat.get("in_place") else "out"
    if out_key == "out":
        pool["out"] = torch.full(shape, float("nan"), dtype=dtype, device=device)
    write_keys = []
    for j, target in enumerate(writes):  # "new", "x" or "h<k>" (a slot this row also reads)
        key = f"wr{j}" if target == "new" else target
        if target == "new":
            pool[key] = torch.full(shape, float("nan"), dtype=dtype, device=device)
        write_keys.append(key)

    def vec(v):  # random coefficient vector; entries of unread slots are garbage the kernel must ignore
        v = rnd(N_OPERANDS).double()
        if noise is None or noise == "write_only":
            v[ZI] = 0.0
        return tuple(v.tolist())

    out_c = vec(None)
    w_c = [vec(None) for _ in writes] + [tuple(rnd(N_OPERANDS).double().tolist())] * (2 - len(writes))
    if noise == "write_only":
        w_c[0] = w_c[0][:ZI] + (0.7,)
    if noise is None:
        w_c = [c[:ZI] + (0.0,) for c in w_c]
    row = int(torch.randint(0, 2**32, (1,), generator=g))
    known_s = 0.0 if mask in (None, "plain") else float(rnd(1))
    coef = (float(rnd(1)), float(rnd(1)), *out_c, *w_c[0], *w_c[1], float(rnd(1)), known_s)
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
            mask=p.get("mask"), known=p.get("known"),
        )

    return pool, make_args, [out_key, *write_keys]


def check(run, feat: dict, shape, dtype: torch.dtype, device, seed: int = 0) -> None:
    """``run(args)`` (the backend under test) equals ``reference`` on the row ``feat``."""
    pool, make_args, outputs = build(feat, shape, dtype, seed, device)
    ref = {k: v.clone() for k, v in pool.items()}
    got = {k: v.clone() for k, v in pool.items()}
    a_ref, a_got = make_args(ref), make_args(got)
    ops.validate(a_got)
    reference.step(a_ref)
    run(a_got)
    noise = bool(feat.get("noise")) or feat.get("mask") in ("philox", "external")
    tol = tolerance(dtype, noise)
    for k in pool:
        a, b = got[k].double(), ref[k].double()
        if k in outputs:
            assert torch.isfinite(a).all(), f"{k}: the kernel left poisoned or non-finite values"
            err = ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()
            assert err <= tol, f"{k}: relative error {err:.3g} > {tol:.3g} ({dtype}, shape {shape}, {feat})"
            if dtype in (torch.float16, torch.bfloat16):
                check_rounding(k, got[k], ref[k])
        else:
            assert torch.equal(got[k], pool[k]), f"input {k} was modified"


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
    "in_place_everything": {"in_place": True, "cfg": True, "rescale": True, "clip": 2, "reads": 4,
                            "writes": ("h0", "h2"), "mask": "philox", "noise": "philox"},
}
EVERYTHING = {"cfg": True, "rescale": True, "clip": 2, "reads": 4, "writes": ("h1", "new"), "mask": "philox",
              "noise": "philox"}
"""Every feature at once, out of place (tests add ``in_place=True``)."""
