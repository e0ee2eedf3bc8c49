"""Random step cases for the cpu backend tests: one plan row's tensors with chosen features.

A case is a pool of named tensors plus a function that builds ``StepArgs`` over any pool, so a
cloned pool keeps the same aliasing (``out`` is ``x``, a written slot is a read slot, ...).
Outputs that alias no input are NaN-poisoned so an unwritten element fails the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastdiff.core.args import C_G, C_KNOWN_S, C_OUT, C_W0, N_COEF, StepArgs
from fastdiff.core.plan import MAX_WRITES, N_OPERANDS, OP_E, OP_Z

FEATURES = {
    "plain": {},
    "cfg": {"cfg": True},
    "cfg_rescale": {"cfg": True, "rescale": True},
    "rescale_only": {"rescale": True},
    "static_clip": {"clip": 1, "cfg": True},
    "dynamic_clip": {"clip": 2},
    "mask": {"mask": "plain", "reads": 1},
    "mask_philox_z2": {"mask": "philox", "noise": "philox"},
    "mask_external_z2": {"mask": "external", "noise": "external"},
    "reads4_writes2": {"reads": 4, "writes": ("read0", "new")},
    "reads2_write_aliases_read": {"reads": 2, "writes": ("read1",)},
    "write_aliases_x": {"reads": 1, "writes": ("x",)},
    "two_writes_alias_reads": {"reads": 3, "writes": ("read2", "read0"), "cfg": True},
    "philox": {"noise": "philox", "reads": 1, "writes": ("new",)},
    "philox_write_only": {"noise": "write_only", "writes": ("new",)},
    "external_noise": {"noise": "external", "writes": ("read0",), "reads": 1},
    # the model output e as an operand (contract v2): the kernel's specialised row with e, e in only
    # x' or only the writes, e next to a clipped d (diffusers' DDIM default), noise, CFG and rescale
    "plain_e": {"e": "all", "reads": 2, "writes": ("read1", "new")},
    "plain_e_out_only_cfg": {"e": "out", "cfg": True, "reads": 1, "writes": ("new",)},
    "e_writes_only": {"e": "writes", "reads": 1, "writes": ("read0", "new")},
    "e_static_clip_cfg": {"e": "all", "clip": 1, "cfg": True, "writes": ("new",)},
    "e_dynamic_clip_cfg_rescale": {"e": "out", "clip": 2, "cfg": True, "rescale": True, "reads": 1},
    "e_philox": {"e": "all", "noise": "philox", "reads": 1, "writes": ("new",)},
    # the gradient term e += c_g * g: alone, with c_g = 0 (still added, as reference does), read
    # in place from x itself, and with everything it interacts with
    "g": {"g": "random"},
    "g_zero_coef_e": {"g": "zero", "e": "all", "reads": 1},
    "g_is_x_e": {"g": "x", "e": "out", "writes": ("x",)},
    "g_cfg_rescale_clip_e": {"g": "random", "e": "all", "cfg": True, "rescale": True, "clip": 1, "reads": 2,
                             "writes": ("read1", "new")},
    "everything": {"cfg": True, "rescale": True, "clip": 2, "mask": "philox", "noise": "philox", "reads": 3,
                   "writes": ("read2", "new"), "e": "all", "g": "random"},
}
"""Named feature sets covering every part of a row (see fastdiff/core/plan.py).

Keys: ``cfg``/``rescale`` (bool), ``clip`` (0/1/2), ``mask`` (None/"plain"/"philox"/"external"),
``noise`` (None/"philox"/"write_only"/"external"), ``reads`` (count), ``writes`` (targets: "new",
"x", "readK"), ``e`` (which combinations get a non-zero e coefficient: None/"out"/"writes"/"all"),
``g`` (None; "random" c_g; "zero" c_g = 0; "x": g is the tensor x itself, random c_g). Coefficients
a row does not use (noise without noise, c_g without g, unused write slots) are random garbage that
the kernel must ignore."""


@dataclass
class Case:
    pool: dict[str, torch.Tensor]
    make: Callable[[dict[str, torch.Tensor]], StepArgs]
    outputs: tuple[str, ...]
    noise: bool  # whether Philox or external noise enters an output


def make_case(feat: dict, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, inplace: bool) -> Case:
    """Random inputs for one row with the features ``feat`` (keys as in ``FEATURES``)."""
    b = shape[0]

    def field():
        return torch.randn(shape, generator=gen).to(dtype)

    def poisoned():
        return torch.full(shape, float("nan"), dtype=dtype)

    n_reads = feat.get("reads", 0)
    writes = feat.get("writes", ())
    noise = feat.get("noise")
    mask = feat.get("mask")
    e_in = feat.get("e")
    g_mode = feat.get("g")
    pool = {"x": field(), "m": field()}
    if g_mode in ("random", "zero"):
        pool["g"] = field()
    for k in range(n_reads):
        pool[f"h{k}"] = field()
    if feat.get("cfg"):
        pool["m_c"] = field()
        pool["w"] = torch.rand(b, generator=gen) * 9 - 1  # includes w < 0 and w > 1
    if feat.get("rescale"):
        pool["r"] = torch.rand(b, generator=gen) + 0.5
    clip = feat.get("clip", 0)
    if clip:
        pool["s"] = torch.rand(b, generator=gen) * 1.5 + 0.5  # small enough that clamping happens
    if mask:
        mk = torch.rand(shape, generator=gen)
        mk = torch.where(mk < 0.25, 0.0, torch.where(mk > 0.75, 1.0, mk))  # exact 0 and 1 too
        pool["mask"], pool["known"] = mk.to(dtype), field()
    if noise == "external":
        pool["z"] = field()
    if mask == "external":
        pool["z2"] = field()
    if noise in ("philox", "write_only") or mask == "philox":
        pool["seeds"] = torch.randint(-(2**63), 2**63 - 1, (b,), generator=gen, dtype=torch.int64)

    coef = [float(v) for v in torch.randn(N_COEF, generator=gen)]
    out_z, w_z = C_OUT + OP_Z, [C_W0 + N_OPERANDS * j + OP_Z for j in range(MAX_WRITES)]
    out_e, w_e = C_OUT + OP_E, [C_W0 + N_OPERANDS * j + OP_E for j in range(MAX_WRITES)]
    if e_in not in ("out", "all"):
        coef[out_e] = 0.0
    if e_in not in ("writes", "all"):
        for j in range(len(writes)):  # unused write slots keep garbage
            coef[w_e[j]] = 0.0
    if g_mode == "zero":
        coef[C_G] = 0.0
    if noise in (None, "write_only"):
        coef[out_z] = 0.0
    if noise is None or not writes:
        for i in w_z:
            coef[i] = 0.0
    if noise == "write_only":
        coef[w_z[0]] = 0.7
    if mask in (None, "plain"):
        coef[C_KNOWN_S] = 0.0
    row = int(torch.randint(0, 2**31, (1,), generator=gen))

    if not inplace:
        pool["out"] = poisoned()
    write_names = []
    for j, target in enumerate(writes):
        if target == "new":
            pool[f"hw{j}"] = poisoned()
            write_names.append(f"hw{j}")
        elif target == "x":
            write_names.append("x")
        else:  # "readK"
            write_names.append(f"h{int(target[4:])}")
    out_name = "x" if inplace else "out"

    def make(p: dict[str, torch.Tensor]) -> StepArgs:
        return StepArgs(
            x=p["x"], out=p[out_name], m=p["m"], coef=tuple(coef), row=row, m_c=p.get("m_c"),
            h_read=tuple(p[f"h{k}"] for k in range(n_reads)), h_write=tuple(p[n] for n in write_names),
            w=p.get("w"), r=p.get("r"), s=p.get("s"), clip=clip, seeds=p.get("seeds"), z=p.get("z"),
            z2=p.get("z2"), mask=p.get("mask"), known=p.get("known"), g=p["x"] if g_mode == "x" else p.get("g"),
        )

    outputs = tuple(dict.fromkeys([out_name, *write_names]))
    return Case(pool, make, outputs, noise is not None or mask in ("philox", "external"))


def clone_pool(pool: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deep copy of a pool (same names, so ``Case.make`` rebuilds the same aliasing)."""
    return {k: v.clone() for k, v in pool.items()}


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of ``t`` (float64 tensor)."""
    fi = torch.finfo(dtype)
    mag = t.double().abs().clamp_min(fi.smallest_normal)
    _, e = torch.frexp(mag)  # mag = f * 2**e with f in [0.5, 1)
    return torch.ldexp(torch.ones_like(mag), e - 1) * fi.eps


def kernel_normals(seeds, row: int, stream: int, numel: int, device=None) -> torch.Tensor:
    """``rng.philox_normal`` computed by the kernel's own noise code (same signature)."""
    from fastdiff import _C

    s = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).contiguous()
    out = torch.empty(s.numel(), numel)
    _C.philox_normals(out.data_ptr(), s.data_ptr(), s.numel(), numel, row & 0xFFFFFFFF, stream)
    return out


def check_ulp(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Per element, ``a`` within one ulp of ``dtype`` of ``b`` (one rounding of the storage type)."""
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten NaN poison?)"
    assert torch.isfinite(b).all(), f"{what}: reference is not finite (bad test case)"
    diff = (a.double() - b.double()).abs()
    allowed = ulp(torch.maximum(a.double().abs(), b.double().abs()), dtype)
    worst = float((diff / allowed).max()) if diff.numel() else 0.0
    assert worst <= 1.0, f"{what}: {worst:.2f} ulp of {dtype} from reference"


def check_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, noise: bool, what: str) -> None:
    """``a`` (cpu) against ``b`` (reference) by ‖a−b‖/‖b‖ with DESIGN.md's tolerance for ``dtype``:
    fp32 1e-6; fp64 1e-12 (1e-6 with noise: normals are float32 by specification); fp16/bf16 one
    rounding of the storage type (its unit roundoff; per element, see ``check_ulp``)."""
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten NaN poison?)"
    assert torch.isfinite(b).all(), f"{what}: reference is not finite (bad test case)"
    if dtype in (torch.float16, torch.bfloat16):
        tol = torch.finfo(dtype).eps / 2
    else:
        tol = 1e-6 if dtype == torch.float32 or noise else 1e-12
    den = float(b.double().norm())
    err = float((a.double() - b.double()).norm()) / max(den, 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:g}"
