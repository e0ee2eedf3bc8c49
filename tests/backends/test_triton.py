"""The ``triton`` backend equals ``reference`` on every feature of a plan row, shape and dtype.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by this folder's
conftest before triton is imported); with a GPU they run compiled on CUDA tensors.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from fastdiff.core import args as fargs  # noqa: E402
from fastdiff.runtime import ops
from fastdiff.core import plan, rng  # noqa: E402
from fastdiff.core.args import C_OUT, N_COEF, StepArgs, pack_row  # noqa: E402
from fastdiff.backends import reference  # noqa: E402
from fastdiff.backends import triton as tb  # noqa: E402
from fastdiff.core.plan import OP_E, OP_Z, Row, combo  # noqa: E402

from ._cases import EVERYTHING, FEATURES, SEEDS, check_tiny_e_coefficient, triton_kernels  # noqa: E402
from ._cases import check as _check  # noqa: E402

K, DEVICE = triton_kernels()
BLOCK = K.INTERPRET_BLOCK if K.INTERPRETED else max(K.GPU_BLOCKS)


def _run(args):
    assert tb.supports(args)
    tb.step(args)


def check(feat, shape, dtype, seed=0):
    _check(_run, feat, shape, dtype, DEVICE, seed)


@pytest.mark.parametrize("name", list(FEATURES))
def test_every_feature_fp32(name):
    check(FEATURES[name], (5, 3, 11), torch.float32, seed=len(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("numel", [1, 3, 17, 33, 257, 2 * BLOCK + 5])
def test_odd_shapes_and_dtypes(numel, dtype):
    # numel per sample; the last two end in a tail past full blocks
    for batch, in_place in ((1, False), (5, True)):
        check(dict(EVERYTHING, in_place=in_place), (batch, numel), dtype, seed=numel + batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feat", ["external_noise", "mask_external_known_noise", "static_clip"])
def test_features_low_precision(feat, dtype):
    check(FEATURES[feat], (5, 2, 3, 7), dtype, seed=7)


# --- contract v3: the next model input u and the non-finite flag ------------------------------------

_V3 = [k for k in FEATURES if k.startswith(("u1", "u2", "flag")) or k == "in_place_everything"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", _V3)
def test_model_input_and_flag_other_dtypes(name, dtype):
    # fp32 runs in test_every_feature_fp32; a tail past a full block, samples of odd length
    check(FEATURES[name], (3, BLOCK + 9), dtype, seed=len(name) + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("copies", [1, 2])
def test_model_input_is_stored_x_times_scale_bit_exact(copies, dtype):
    """u is x' as stored (rounded to the storage type) times u_scale in the compute type, rounded
    once more: exactly torch's ``out * in_scale`` on the result, in every copy."""
    gen = torch.Generator().manual_seed(copies)
    b, n = 3, 2 * BLOCK + 5
    x = torch.randn(b, n, generator=gen).to(dtype).to(DEVICE)
    m = torch.randn(b, n, generator=gen).to(dtype).to(DEVICE)
    u_scale = 0.7310585786300049  # not representable in float32: rounded first, as the reference does
    coef = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.9, a_e=-0.3, out=combo(x=0.55, d=0.45, e=0.1)),
                    u_scale=u_scale)
    out = torch.full_like(x, float("nan"))
    u = torch.full((copies * b, n), float("nan"), dtype=dtype, device=DEVICE)
    tb.step(StepArgs(x=x, out=out, m=m, coef=coef, u=u))
    cdt = fargs.compute_dtype(dtype)
    scale = u_scale if cdt == torch.float64 else torch.tensor(u_scale, dtype=torch.float32).item()
    want = (out.to(cdt) * scale).to(dtype)
    for c in range(copies):
        assert torch.equal(u[c * b:(c + 1) * b], want), c


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("where", ["m", "m_c"])
def test_flag_sees_one_nonfinite_element_anywhere(where):
    # every block boundary and the tail of a multi-block row; x and g are not model output
    b, n = 3, 2 * BLOCK + 5
    x = torch.randn(b, n, device=DEVICE)
    coef = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=-1.0, out=combo(d=1.0)), c_g=0.5)
    for pos in (0, BLOCK - 1, BLOCK, 2 * BLOCK + 4, n, b * n - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            m, m_c = torch.randn(b, n, device=DEVICE), torch.randn(b, n, device=DEVICE)
            (m if where == "m" else m_c).view(-1)[pos] = bad
            flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
            tb.step(StepArgs(x=x, out=torch.empty_like(x), m=m, m_c=m_c, w=torch.ones(b, device=DEVICE), flag=flag,
                             coef=coef))
            assert flag.tolist() == [1], (where, pos, bad)
    # non-finite state or gradient is no model output; a set flag is never cleared
    y, g = x.clone(), torch.randn(b, n, device=DEVICE)
    y[1, 7], g[2, 3] = float("nan"), float("inf")
    for start in (0, 1, 7):
        flag = torch.full((1,), start, dtype=torch.int32, device=DEVICE)
        m = torch.randn(b, n, device=DEVICE)
        tb.step(StepArgs(x=y, out=torch.empty_like(y), m=m, m_c=m.clone(), w=torch.ones(b, device=DEVICE), g=g,
                         flag=flag, coef=coef))
        assert flag.tolist() == [start]


def test_flag_and_model_input_in_one_launch_through_ops():
    """ops.step (validation, staging of a non-contiguous u) runs them on the triton backend too."""
    x = torch.randn(2, 8, device=DEVICE)
    m = torch.randn(2, 8, device=DEVICE)
    m[1, 5] = float("nan")
    coef = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=-1.0, out=combo(x=0.5, d=0.5)), u_scale=2.0)
    u_t = torch.full((8, 4), float("nan"), device=DEVICE)  # u_t.t() is [4, 8] = 2 copies, not contiguous
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    args = StepArgs(x=x, out=torch.empty_like(x), m=m, coef=coef, u=u_t.t(), flag=flag)
    assert not tb.supports(args)  # a non-contiguous output is staged, never written through wrongly
    ops.step(args, backend="triton")
    assert flag.item() == 1
    want = args.out * 2.0
    assert torch.equal(u_t.t()[:2].isnan(), want.isnan()) and torch.equal(u_t.t()[2:].isnan(), want.isnan())
    fin = want.isfinite()
    assert torch.equal(u_t.t()[:2][fin], want[fin]) and torch.equal(u_t.t()[2:][fin], want[fin])


def test_multi_dim_shape_and_out_of_place_everything():
    check(EVERYTHING, (2, 4, 9, 5), torch.float32, seed=3)


def test_packed_layout_is_fastdiff_args():
    """kernels/step.py keeps no copy of the layout: it imports fastdiff.core.args' and fastdiff.core.plan's,
    and names the kernel's positional coefficient parameters from those offsets."""
    assert K.N_COEF == N_COEF == 30
    for name in ("N_COEF", "C_AX", "C_AE", "C_OUT", "C_W0", "C_W1", "C_KNOWN_A", "C_KNOWN_S", "C_G", "C_U"):
        assert getattr(K, name) is getattr(fargs, name), name
    for name in ("N_OPERANDS", "OP_X", "OP_D", "OP_E", "OP_H", "OP_Z", "MAX_READS", "MAX_WRITES"):
        assert getattr(K, name) is getattr(plan, name), name
    # not re-declared in the source either (an equal literal would pass the identity checks for small ints)
    src = inspect.getsource(K)
    for name in ("N_COEF", "C_AX", "C_AE", "C_OUT", "C_W0", "C_W1", "C_KNOWN_A", "C_KNOWN_S", "C_G", "C_U", "MAX_READS",
                 "MAX_WRITES", "N_OPERANDS", "OP_X", "OP_D", "OP_E", "OP_H", "OP_Z"):
        assigned = rf"^{name}\b[^\n]*=|^[A-Z0-9_, ]*\b{name}\b[A-Z0-9_, ]*="  # NAME = ..., A, NAME, B = ...
        assert not re.search(assigned, src, re.M), f"{name} is redefined"
    # the kernel takes the row as one float64 pointer and reads it at these offsets (constexpr copies
    # of the values above, made from them)
    params = list(inspect.signature(K._step_kernel.fn).parameters)
    assert "coef_ptr" in params and not {"a_x", "u_scale", "o_x", "q_z"} & set(params)
    for name in ("C_AX", "C_AE", "C_OUT", "C_W0", "C_W1", "C_KNOWN_A", "C_KNOWN_S", "C_G", "C_U", "OP_X", "OP_D",
                 "OP_E", "OP_H", "OP_Z"):
        assert getattr(K, "_" + name).value == getattr(fargs if name.startswith("C_") else plan, name), name
    assert {"U_COPIES", "CHECK"} <= set(K._TUNE_KEY) and {"u_ptr", "flag_ptr"} <= set(K._OUTPUTS)


def test_e_coefficient_below_float32_range_is_no_e_term():
    check_tiny_e_coefficient(tb.step, DEVICE)


# --- Philox --------------------------------------------------------------------------------------

@pytest.mark.parametrize("row,stream,numel", [(0, 0, 1), (1, 1, 5), (2**31 + 7, 0, 67), (2**32 - 1, 1, 257)])
def test_philox_words_bit_exact(row, stream, numel):
    seeds = torch.tensor([rng._signed64(s) for s in SEEDS], dtype=torch.int64, device=DEVICE)
    got = K.philox_words(seeds, row, stream, numel)
    want = rng.philox_bits(seeds.cpu(), row, stream, numel)
    assert got.shape == want.shape
    assert torch.equal(got.cpu(), want)


def _noise_only(seeds, numel, row, dtype=torch.float32):
    """x' = z: the kernel's normals for ``seeds`` at ``row``."""
    b = seeds.shape[0]
    x = torch.zeros(b, numel, dtype=dtype, device=DEVICE)
    coef = [0.0] * N_COEF
    coef[C_OUT + OP_Z] = 1.0
    out = torch.full_like(x, float("nan"))
    tb.step(StepArgs(x=x, out=out, m=x, coef=tuple(coef), row=row, seeds=seeds))
    return out


def test_kernel_normals_match_rng_and_ignore_batch_position():
    seeds = torch.tensor([rng._signed64(s) for s in SEEDS], dtype=torch.int64, device=DEVICE)
    numel = 2 * BLOCK + 3
    got = _noise_only(seeds, numel, row=11)
    want = rng.philox_normal(seeds.cpu(), 11, rng.STREAM_MAIN, numel)
    err = ((got.cpu().double() - want.double()).norm() / want.double().norm()).item()
    assert err <= 1e-6
    alone = _noise_only(seeds[5:6], numel, row=11)
    assert torch.equal(alone[0], got[5]), "a sample's noise depends on its batch position"


# --- what the backend refuses ---------------------------------------------------------------------


def test_available_reason_names_the_mode():
    ok, why = tb.available()
    assert ok
    assert ("TRITON_INTERPRET=1" in why) if K.INTERPRETED else ("CUDA" in why)


def _simple_args(**kw):
    x = torch.randn(2, 8, device=DEVICE)
    coef = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=0.5, out=combo(x=1.0, d=1.0, e=-0.25)))
    assert coef[C_OUT + OP_E] == -0.25
    a = dict(x=x, out=torch.empty_like(x), m=torch.randn_like(x), coef=coef)
    a.update(kw)
    return StepArgs(**a)


def test_rejects_non_contiguous_instead_of_reading_wrongly():
    base = torch.randn(8, 2, device=DEVICE)
    args = _simple_args(m=base.t())
    assert not base.t().is_contiguous()
    assert not tb.supports(args)
    assert not tb.supports(_simple_args(g=base.t()))
    with pytest.raises(RuntimeError, match="contiguous"):
        tb.step(args)
    # ops.step runs the kernel on contiguous copies instead, equal to the reference
    ref = StepArgs(**{**args.__dict__, "out": torch.empty_like(args.out)})
    reference.step(ref)
    ops.step(args, backend="triton")
    torch.testing.assert_close(args.out, ref.out, rtol=1e-6, atol=1e-6)


def test_rejects_partially_overlapping_output():
    flat = torch.randn(17, device=DEVICE)
    args = _simple_args(x=flat[:16].view(2, 8), out=flat[1:17].view(2, 8))
    assert not tb.supports(args)
    assert not tb.supports(_simple_args(g=flat[:16].view(2, 8), out=flat[1:17].view(2, 8)))
    x = torch.randn(2, 8, device=DEVICE)
    assert tb.supports(_simple_args(x=x, out=x))  # exact in-place is fine


def test_rejects_unsupported_dtype_and_device():
    args = _simple_args()
    args.x = args.x.to(torch.int32)
    assert not tb.supports(args)
    if not K.INTERPRETED:  # compiled kernels run on CUDA tensors only
        assert not tb.supports(_simple_args(x=torch.randn(2, 8), out=torch.empty(2, 8), m=torch.randn(2, 8)))


def test_wrapper_errors_name_the_argument():
    x = torch.randn(2, 8, device=DEVICE)
    zeros = (0.0,) * N_COEF
    with pytest.raises(ValueError, match="coef must have 30 entries, got 25"):
        K.fused_step(x, x, x, (0.0,) * 25)  # a contract-v1 row
    with pytest.raises(ValueError, match="coef must have 30 entries, got 29"):
        K.fused_step(x, x, x, (0.0,) * 29)  # a contract-v2 row, without u_scale
    with pytest.raises(ValueError, match="clip must be 0, 1 or 2, got 5"):
        K.fused_step(x, x, x, zeros, clip=5)
    with pytest.raises(ValueError, match="m_c was given without the guidance scale w"):
        K.fused_step(x, x, x, zeros, m_c=x)
    noisy = list(zeros)
    noisy[C_OUT + OP_Z] = 1.0
    with pytest.raises(ValueError, match="uses noise z: give seeds"):
        K.fused_step(x, x, x, tuple(noisy))
    with pytest.raises(ValueError, match="m must be contiguous"):
        K.fused_step(x, x, torch.randn(8, 2, device=DEVICE).t(), zeros)
    with pytest.raises(ValueError, match="g must be contiguous"):
        K.fused_step(x, x, x, zeros, g=torch.randn(8, 2, device=DEVICE).t())
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match=r"u must have shape \(2, ...\) or \(4, ...\)"):
        K.fused_step(x, out, x, zeros, u=torch.empty(6, 8, device=DEVICE))
    with pytest.raises(ValueError, match="u must have x's dtype"):
        K.fused_step(x, out, x, zeros, u=torch.empty(2, 8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="u must be contiguous"):
        K.fused_step(x, out, x, zeros, u=torch.empty(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match=r"each copy u\[c\] must be contiguous"):
        K.fused_step(x, out, x, zeros, u=torch.empty(2, 8, 2, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="the copies of u overlap"):
        K.fused_step(x, out, x, zeros, u=torch.empty(24, device=DEVICE).as_strided((2, 2, 8), (8, 8, 1)))
    with pytest.raises(ValueError, match="flag must be an int32 tensor of one element"):
        K.fused_step(x, out, x, zeros, flag=torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="flag must be an int32 tensor of one element"):
        K.fused_step(x, out, x, zeros, flag=torch.zeros(2, dtype=torch.int32, device=DEVICE))


def test_ops_dispatch_by_name():
    args = _simple_args()
    ops.step(args, backend="triton")
    ref = _simple_args(x=args.x, m=args.m)
    reference.step(ref)
    assert torch.allclose(args.out, ref.out, rtol=1e-6, atol=0)


# --- the same kernel compiled for a GPU, on a machine without one ------------------------------------

_COMPILE = textwrap.dedent("""
    import inspect, sys, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, sys.argv[1])
    from kernels import step as K
    fn = K._step_kernel
    names = list(inspect.signature(fn.fn).parameters)
    vec = {"w_ptr": "*fp32", "r_ptr": "*fp32", "s_ptr": "*fp32", "seed_ptr": "*i64", "flag_ptr": "*i32",
           "a_ptr": "*fp32", "coef_ptr": "*fp64"}
    blend = dict(BLEND=True, HAS_R=False, HAS_M2=True, HAS_M3=True, HAS_MW=True)  # N branches, momentum write
    for arch in (80, 90):
        for st, cdt, mode in (("fp16", tl.float32, {}), ("bf16", tl.float32, {}), ("fp64", tl.float64, {}),
                              ("bf16", tl.float32, blend)):
            flags = dict(HAS_CFG=True, HAS_R=True, HAS_G=True, CLIP=2, N_READS=4, N_WRITES=2, HAS_MASK=True,
                         E_OUT=True, E_WR0=True, E_WR1=True, Z_MODE=1, Z2_MODE=1, U_COPIES=2, CHECK=True, CDT=cdt,
                         BLEND=False, HAS_M2=False, HAS_M3=False, HAS_MW=False, BLOCK=1024)
            flags.update(mode)
            ints = ("n", "row", "u_stride")
            ptrs = {nm for nm in names if nm.endswith("_ptr")}
            assert set(names) - set(flags) - set(ints) == ptrs
            sig = {nm: (vec.get(nm, "*" + st) if nm.endswith("_ptr") else "i32" if nm in ints
                        else "constexpr") for nm in names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, nm in enumerate(names)
                     if nm.endswith("_ptr") and nm != "flag_ptr" or nm in ("n", "u_stride")}
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=flags, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            ptx = c.asm["ptx"]
            assert "ld.global.v" in ptx and "st.global.v" in ptx, "aligned loads/stores are not vectorised"
            print(arch, st, "ok")
""")


def test_kernel_compiles_for_sm80_and_sm90():
    """Without a GPU: lower every feature of the kernel to PTX/cubin (catches what only the compiler sees)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton has no NVIDIA backend: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", _COMPILE, repo], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == 8


def test_prepared_program_decides_once_and_equals_the_checked_path(monkeypatch):
    """The triton backend's prepared program (``prepare``): whole loops (guided, Philox noise, a guider's
    blend rows with momentum, host-drawn generator noise pointed at per call) equal the same loops on
    the reference backend; each row's support and flags are decided once per signature (``supports``
    is not called again on later steps), and again where an operand comes or goes."""
    import fastdiff
    from fastdiff.guiders import APG

    if not tb.available()[0]:
        pytest.skip(tb.available()[1])
    calls = {"supports": 0, "step": 0, "launch": 0}
    orig_supports, orig_step, kmod = tb.supports, tb.step, tb.kernels()
    orig_launch = kmod.launch

    def counting(a):
        calls["supports"] += 1
        return orig_supports(a)

    def checked_step(a):
        calls["step"] += 1
        return orig_step(a)

    def launch(*a, **k):
        calls["launch"] += 1
        return orig_launch(*a, **k)

    monkeypatch.setattr(tb, "supports", counting)
    monkeypatch.setattr(tb, "step", checked_step)
    monkeypatch.setattr(kmod, "launch", launch)

    def model(x, t, c=None):
        return torch.tanh(x) * 0.5 + (0.2 * c if c is not None else 0.0)

    g = torch.Generator().manual_seed(0)
    x, cond, uncond = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g), torch.zeros(2, 3, 5)
    for kw in (dict(sampler="dpmpp_2m", guidance_scale=3.0, seed=4),
               dict(sampler="euler_ancestral", guidance_scale=2.0, seed=5),
               dict(sampler="euler_ancestral", guidance_scale=2.0, generator="g"),
               dict(sampler="dpmpp_2m", guidance=APG(scale=3.0, momentum=-0.5), seed=6)):
        results = []
        for backend in ("triton", "reference"):
            fastdiff.clear_cache()
            k = dict(kw)
            if k.get("generator") == "g":
                k["generator"] = torch.Generator().manual_seed(9)
            calls.update(supports=0, step=0, launch=0)
            results.append(fastdiff.sample(model, x, steps=6, cond=cond, uncond=uncond, backend=backend, **k))
            if backend == "triton":
                rows = calls["launch"]
                assert rows >= 6 and calls["step"] == 0, f"{kw}: {calls}"  # every row launched directly
                assert calls["supports"] <= 2 * rows, f"{kw}: {calls}"  # prepare's check, and once per row
        torch.testing.assert_close(results[0], results[1], rtol=2e-5, atol=2e-5, msg=str(kw))
