"""The triton backend's launch path (issue 19 item 2): the device coefficient table, the fixed
launch configuration, and the direct launch of the compiled kernel.

The table runs for real (interpreter on CPU, compiled on a GPU). The fixed configuration and the
direct launch only exist for compiled kernels, so here they run against a fake ``JITFunction`` and
a fake compiled kernel, which record what the launcher passes them.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from fastdiff.backends import triton as tb  # noqa: E402
from fastdiff.core.args import N_COEF, StepArgs, pack_row  # noqa: E402
from fastdiff.core.plan import Row, combo  # noqa: E402
from fastdiff.runtime import ops  # noqa: E402

from ._cases import EVERYTHING, build, triton_kernels  # noqa: E402

K, DEVICE = triton_kernels()
SHAPE = (3, 2, 37)  # a tail past one interpreter block


def _scaled(coef, f):
    """The same terms (no flag changes) with other values."""
    return tuple(c * f for c in coef)


def _pool(seed, feat=EVERYTHING, shape=SHAPE, dtype=torch.float32):
    pool, make_args, outputs = build(feat, shape, dtype, seed, DEVICE)
    return pool, make_args, outputs


def _unprepared(pool, make_args, outputs, coef):
    """The outputs of one fresh checked step (``tb.step``) with ``coef`` on a copy of ``pool``."""
    fresh = {k: v.clone() for k, v in pool.items()}
    a = make_args(fresh)
    a.coef = coef
    tb.step(a)
    return {k: fresh[k] for k in outputs}


def _assert_bits(got, want, what):
    for k in want:
        assert torch.equal(got[k], want[k]) or torch.equal(got[k].isnan(), want[k].isnan()) and torch.equal(
            got[k].nan_to_num(), want[k].nan_to_num()), f"{what}: {k} differs"


def _prepared(rows):
    prog = ops.prepare(rows, backend="triton")
    assert isinstance(prog._step, tb._PreparedSteps)
    return prog._step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_prepared_equals_unprepared_bit_for_bit(dtype):
    pool, make_args, outputs = _pool(1, dtype=dtype)
    want = _unprepared(pool, make_args, outputs, make_args(pool).coef)
    got = {k: v.clone() for k, v in pool.items()}
    a = make_args(got)
    steps = _prepared([a])
    steps(a)
    _assert_bits({k: got[k] for k in outputs}, want, str(dtype))
    assert torch.equal(steps._table.table[0].cpu(), torch.tensor(a.coef, dtype=torch.float64))


def test_coefficients_changing_between_calls_rewrite_the_row():
    pool, make_args, outputs = _pool(2)
    base = make_args(pool).coef
    got = {k: v.clone() for k, v in pool.items()}
    a = make_args(got)
    steps = _prepared([a])
    table = steps._table.table
    ptr = table.data_ptr()
    zero_e = list(_scaled(base, 0.5))
    zero_e[K.C_OUT + K.OP_E] = 0.0  # a term goes away: the flags change too
    # only the signs of its zeros change: equal as floats, another row in bits
    neg_zero = list(zero_e)
    neg_zero[K.C_OUT + K.OP_E] = -0.0
    assert tuple(neg_zero) == tuple(zero_e)
    for coef in (_scaled(base, 0.75), tuple(zero_e), base, base, tuple(zero_e), tuple(neg_zero), tuple(zero_e)):
        start = {k: v.clone() for k, v in got.items()}
        a.coef = coef
        steps(a)
        want = _unprepared(start, make_args, outputs, coef)
        _assert_bits({k: got[k] for k in outputs}, want, str(coef[:3]))
        assert torch.equal(table[0].cpu().view(torch.int64), torch.tensor(coef, dtype=torch.float64).view(torch.int64))
    assert steps._table.table.data_ptr() == ptr, "the table was reallocated instead of rewritten"


def test_two_programs_keep_their_own_tables():
    pools = [_pool(s) for s in (3, 4, 5)]
    coefs = [_scaled(p[1](p[0]).coef, f) for p, f in zip(pools, (1.0, 0.9, 1.1))]
    runs = [{k: v.clone() for k, v in p[0].items()} for p in pools]
    args = [p[1](r) for p, r in zip(pools, runs)]
    for a, c in zip(args, coefs):
        a.coef = c
    first, second = _prepared(args[:2]), _prepared(args[2:])
    assert first._table.table.shape == (2, N_COEF) and second._table.table.shape == (1, N_COEF)
    assert first._table.table.data_ptr() != second._table.table.data_ptr()
    wants = [_unprepared(p[0], p[1], p[2], c) for p, c in zip(pools, coefs)]
    second(args[2])  # interleaved: each launch reads its own program's row
    first(args[1])
    first(args[0])
    for run, p, want, i in zip(runs, pools, wants, range(3)):
        _assert_bits({k: run[k] for k in p[2]}, want, f"row {i}")


def test_unprepared_coefficient_cache():
    coef = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=0.5, out=combo(x=1.0, d=0.0)))
    dev = torch.device(DEVICE)
    t = K.coef_tensor(coef, dev)
    assert t.dtype == torch.float64 and t.shape == (N_COEF,) and t.tolist() == list(coef)
    assert K.coef_tensor(list(coef), dev) is t  # keyed by the values, not the container
    neg = list(coef)
    neg[K.C_OUT + K.OP_D] = -0.0  # equal as floats, other bits: another entry
    assert K.coef_tensor(neg, dev) is not t
    for i in range(K.COEF_CACHE_SIZE + 5):
        K.coef_tensor((float(i),) * N_COEF, dev)
    assert len(K._coef_cache) <= K.COEF_CACHE_SIZE


def test_no_upload_during_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured.*run the loop once eagerly"):
        K.coef_tensor((0.125,) * N_COEF, cuda)  # a new row: refused before any allocation
    with pytest.raises(RuntimeError, match="preparing a program would upload coefficients while a CUDA graph"):
        K.CoefTable([(0.0,) * N_COEF], cuda)
    table = K.CoefTable.__new__(K.CoefTable)
    table.table, table._bits, table._rows = types.SimpleNamespace(device=cuda), [b""], [None]
    with pytest.raises(RuntimeError, match="coefficient row 0 changed, so its rewrite would upload"):
        table.write(0, (1.0,) * N_COEF)


# --- the fixed configuration -------------------------------------------------------------------------


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_fixed_config_table(dtype):
    cap = {2: 4096, 4: 2048, 8: 1024}[torch.empty((), dtype=dtype).element_size()]
    for sms in (108, 132):
        target = K.FIXED_WAVES * sms
        for n in (1, 5, 100, 1000, 4096, 16384, 65536, 3 * 512 * 512):
            for b in (1, 2, 16, 64):
                blk, nw = K.fixed_config(n, b, dtype, sms)
                case = (n, b, sms, blk)
                assert blk & (blk - 1) == 0 and 128 <= blk <= cap and nw == (4 if blk <= 1024 else 8), case
                assert blk <= max(128, _next_pow2(n)), case  # never far larger than a sample
                if blk < min(cap, max(128, _next_pow2(n))):  # halved: only while the grid was short of the target
                    assert blk >= 512 and b * -(-n // (2 * blk)) < target, case
                    assert blk == 512 or b * -(-n // blk) >= target, case
    assert K.fixed_config(16 * 4 * 128 * 128, 16, dtype, 132)[0] == cap  # a big step: the largest block
    assert K.fixed_config(4 * 64 * 64, 1, dtype, 132)[0] == 512  # a small one: the most programs


# --- the direct launch, against fakes --------------------------------------------------------------


class _FakeCompiled:
    def __init__(self, log, name):
        self.log, self.name = log, name
        self.function, self.packed_metadata = f"function-{name}", f"metadata-{name}"

    def run(self, *args):
        self.log.append(("direct", self.name, args))


class _FakeJIT:
    """``fn[grid](*args, **kwargs)``: records the launch and returns a new fake compiled kernel."""

    def __init__(self):
        self.log, self.count = [], 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
            self.log.append(("jit", grid, args, kwargs))
            return _FakeCompiled(self.log, self.count)
        return launch


STREAM = 0x5EED


@pytest.fixture
def fake_gpu(monkeypatch):
    """The compiled-kernel launch path on CPU tensors: a fake JIT kernel and compiled kernels, the
    current device ``None`` (a CPU tensor's index), a fixed stream."""
    jit = _FakeJIT()
    monkeypatch.setattr(K, "_step_kernel", jit)
    monkeypatch.setattr(K, "INTERPRETED", False)
    monkeypatch.setattr(K, "DIRECT", True)
    monkeypatch.setattr(K, "_direct", {})
    monkeypatch.setattr(K, "_sm_count", lambda index: 132)
    monkeypatch.setattr(K, "_stream", lambda index: STREAM)
    monkeypatch.setattr(K, "_current_device", lambda: None)
    monkeypatch.delenv("FASTDIFF_TRITON_AUTOTUNE", raising=False)
    return jit


def _args(n=40, b=2, offset=0, row=3):
    flat = torch.randn(b * n + offset)
    x = flat[offset:].view(b, n)
    coef = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.5, a_e=0.5, out=combo(x=0.5, d=0.5, e=0.1, z=0.2),
                        noise=True))
    return dict(x=x, out=torch.empty_like(x), m=torch.randn(b, n), coef=coef, row=row, seeds=torch.arange(b),
                h_read=(torch.randn(b, n),), h_write=(torch.empty(b, n),), m_c=torch.randn(b, n), w=torch.ones(b))


def _step(kw):
    kw = dict(kw)
    x, out, m, coef = kw.pop("x"), kw.pop("out"), kw.pop("m"), kw.pop("coef")
    K.fused_step(x, out, m, coef, **kw)


def test_direct_launch_passes_every_argument_in_parameter_order(fake_gpu):
    kw = _args(n=40, b=2)
    _step(kw)
    _step(kw)
    assert [e[0] for e in fake_gpu.log] == ["jit", "direct"]
    _, grid, jit_args, jit_kwargs = fake_gpu.log[0]
    _, name, direct = fake_gpu.log[1]
    blk, nw = K.fixed_config(40, 2, torch.float32, 132)
    assert grid == (-(-40 // blk), 2) and jit_kwargs["BLOCK"] == blk and jit_kwargs["num_warps"] == nw
    # the launcher's leading arguments: grid, the current stream, the compiled kernel's handles, no hooks
    assert direct[:9] == (grid[0], 2, 1, STREAM, "function-1", "metadata-1", None, None, None) and name == 1
    params = K._PARAMS
    values = dict(zip(params, jit_args))  # the JIT launch names pointers and integers positionally
    values.update({k: v for k, v in jit_kwargs.items() if k in params})
    assert set(values) == set(params)
    want = tuple(values[p] for p in params)  # every parameter, in order (the launcher drops constexprs)
    assert len(direct[9:]) == len(params)
    for p, got, exp in zip(params, direct[9:], want):
        if isinstance(exp, torch.Tensor):  # pointers as their addresses
            assert type(got) is int and got == exp.data_ptr(), p
        else:
            assert got is exp or got == exp, p
    assert values["x_ptr"] is kw["x"] and values["n"] == 40 and values["row"] == 3
    coef_t = values["coef_ptr"]
    assert coef_t.dtype == torch.float64 and coef_t.tolist() == list(kw["coef"])


def test_specialisation_is_part_of_the_key(fake_gpu):
    def kinds():
        kinds, fake_gpu.log[:] = [e[0] for e in fake_gpu.log], []
        return kinds

    base = _args(n=40, b=2)
    _step(base)
    _step(base)
    assert kinds() == ["jit", "direct"]
    # a pointer 4 bytes off 16-byte alignment: Triton compiles another kernel, so must this path
    odd = _args(n=40, b=2, offset=1)
    assert odd["x"].data_ptr() % 16 != 0
    _step(odd)
    _step(odd)
    assert kinds() == ["jit", "direct"]
    assert fake_gpu.log == [] and len(K._direct) == 2
    # n == 1 is a constexpr in Triton's key; n == 16 is divisible by 16
    for n in (1, 16):
        one = _args(n=n, b=2)
        _step(one)
        _step(one)
        assert kinds() == ["jit", "direct"], n
    # row above 2**31 - 1: an i64 argument
    _step(_args(row=2**31))
    _step(_args(row=2**31 + 5))
    assert kinds() == ["jit", "direct"]
    # and the first variant is still launched directly, by its own compiled kernel
    _step(base)
    assert fake_gpu.log[0][:2] == ("direct", 1)


def test_direct_keys_on_the_tuning_mode_and_the_dtypes(fake_gpu, monkeypatch):
    base = _args(n=40, b=2)
    _step(base)
    half = {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "w" else v)
            for k, v in base.items()}
    half["h_read"] = tuple(h.half() for h in base["h_read"])
    half["h_write"] = tuple(h.half() for h in base["h_write"])
    _step(half)
    assert [e[0] for e in fake_gpu.log] == ["jit", "jit"]


def test_no_direct_launch_where_triton_differs(fake_gpu, monkeypatch):
    # a launch that returns no CompiledKernel-like object: the normal launch every time
    calls = []

    class Plain:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(grid) or object()

    monkeypatch.setattr(K, "_step_kernel", Plain())
    kw = _args()
    for _ in range(3):
        _step(kw)
    assert len(calls) == 3 and K._direct == {}
    # decided once, from the installed Triton's source
    monkeypatch.setattr(K, "INTERPRETED", False)
    monkeypatch.delenv("FASTDIFF_TRITON_DIRECT", raising=False)
    assert K._direct_supported(), "the installed triton's JITFunction.run is not the launch this path copies"
    monkeypatch.setenv("FASTDIFF_TRITON_DIRECT", "0")
    assert not K._direct_supported()
    monkeypatch.delenv("FASTDIFF_TRITON_DIRECT")
    monkeypatch.setattr(K.inspect, "getsource", lambda fn: "def run(self, *args): return self.launch(*args)")
    assert not K._direct_supported()


def test_prepared_program_launches_directly_with_its_table_row(fake_gpu, monkeypatch):
    """The prepared path: its table's row view is the coefficient pointer of every launch."""
    a = StepArgs(**_args(n=40, b=2))
    steps = tb._PreparedSteps([a])
    monkeypatch.setattr(tb, "supports", lambda args: True)  # (CPU tensors with INTERPRETED patched off)
    steps(a)
    steps(a)
    assert [e[0] for e in fake_gpu.log] == ["jit", "direct"]
    assert fake_gpu.log[1][2][9 + K._PARAMS.index("coef_ptr")] == steps._table.row(0).data_ptr()
    assert fake_gpu.log[0][2][K._PARAMS.index("coef_ptr")] is steps._table.row(0)


def test_a_launch_hook_takes_the_normal_path(fake_gpu):
    """A profiler's launch hook needs Triton's launch metadata: no direct launch while one is set."""
    import triton

    kw = _args()
    _step(kw)
    hook = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip("this triton's launch hooks are not chains")
    hook.add(print)
    try:
        _step(kw)
    finally:
        hook.remove(print)
    _step(kw)
    assert [e[0] for e in fake_gpu.log] == ["jit", "jit", "direct"]


def _program(monkeypatch, a, reductions=None):
    monkeypatch.setattr(tb, "supports", lambda args: True)  # (CPU tensors with INTERPRETED patched off)
    prog = tb.prepare([a], [None] if reductions is None else reductions)
    assert isinstance(prog, tb.TritonProgram)
    return prog


def _launches(log):
    kinds, log[:] = [e[0] for e in log], []
    return kinds


def test_program_launches_rows_directly_with_the_model_outputs_address(fake_gpu, monkeypatch):
    """TritonProgram.run: after a row's first step, one launch with every address fixed but the model
    output's, the same arguments as the checked path's direct launch would pass."""
    a = StepArgs(**_args(n=40, b=2))
    prog = _program(monkeypatch, a)
    mo = torch.randn(4, 40)  # the batched model output: [m_u; m_c]
    prog.run(0, mo)
    prog.run(0, mo)
    prog.run(0, mo)
    log = list(fake_gpu.log)
    assert [e[0] for e in log] == ["jit", "direct", "direct"]
    fast = log[2][2]
    assert fast[9 + K._M] == mo.data_ptr() and fast[9 + K._MC] == mo.data_ptr() + 2 * 40 * 4
    # the checked path (the row's own step on the same operands) launches directly with the same arguments
    fake_gpu.log[:] = []
    a.m, a.m_c = mo[:2], mo[2:]
    prog._step(a)
    assert [e[0] for e in fake_gpu.log] == ["direct"] and fake_gpu.log[0][2] == fast
    # another model output buffer: its own addresses, no new decision
    other = torch.randn(4, 40)
    fake_gpu.log[:] = []
    prog.run(0, other)
    got = fake_gpu.log[-1][2]
    assert _launches(fake_gpu.log) == ["direct"]
    assert got[9 + K._M] == other.data_ptr() and got[9 + K._MC] == other.data_ptr() + 320
    assert got[:9 + K._M] == fast[:9 + K._M] and got[9 + K._MC + 1:] == fast[9 + K._MC + 1:]


def test_program_direct_launch_falls_back_where_the_model_output_differs(fake_gpu, monkeypatch):
    a = StepArgs(**_args(n=40, b=2))
    prog = _program(monkeypatch, a)
    mo = torch.randn(4, 40)
    prog.run(0, mo)
    prog.run(0, mo)
    assert _launches(fake_gpu.log) == ["jit", "direct"]
    # 4 bytes off 16-byte alignment: Triton specialises on it, so a kernel of its own through the JIT
    odd = torch.randn(4 * 40 + 1)[1:].view(4, 40)
    prog.run(0, odd)
    assert _launches(fake_gpu.log) == ["jit"]
    assert fake_gpu.log == []
    prog.run(0, mo)  # the launcher still serves the aligned buffer
    assert _launches(fake_gpu.log) == ["direct"]
    # another dtype of model output: the checked path, which keys its own kernel on the dtype
    prog.run(0, mo.double())
    assert _launches(fake_gpu.log) == ["jit"]
    # another current device: the checked path
    monkeypatch.setattr(K, "_current_device", lambda: 7)
    prog.run(0, mo)
    assert _launches(fake_gpu.log) == ["jit"]


def test_program_set_drops_the_rows_launcher(fake_gpu, monkeypatch):
    kw = _args(n=40, b=2)
    a = StepArgs(**kw)
    prog = _program(monkeypatch, a)
    mo = torch.randn(4, 40)
    prog.run(0, mo)
    prog.run(0, mo)
    zi = K._PARAMS.index("h0_ptr")
    assert fake_gpu.log[-1][2][9 + zi] == kw["h_read"][0].data_ptr()
    moved = (torch.randn(2, 40),)
    prog.set(0, "h_read", moved)
    prog.run(0, mo)
    prog.run(0, mo)
    assert all(e[0] == "direct" for e in fake_gpu.log[2:]) and len(fake_gpu.log) == 4
    assert fake_gpu.log[-1][2][9 + zi] == moved[0].data_ptr() == fake_gpu.log[-2][2][9 + zi]
    prog.set(-1, "h_read", kw["h_read"])  # every row's launcher goes
    prog.run(0, mo)
    assert fake_gpu.log[-1][2][9 + zi] == kw["h_read"][0].data_ptr()


def test_program_has_no_launcher_for_reduced_rows_or_copied_operands(fake_gpu, monkeypatch):
    from fastdiff.runtime.ops import Reduction

    kw = _args(n=40, b=2)
    kw["w"] = torch.ones(1).expand(2)  # made contiguous (a new tensor) at every launch
    a = StepArgs(**kw)
    prog = _program(monkeypatch, a)
    mo = torch.randn(4, 40)
    for _ in range(3):
        prog.run(0, mo)
    assert prog._fast == [False]  # the checked path: its direct launch takes each launch's copy of w
    wi = K._PARAMS.index("w_ptr")
    assert [e[0] for e in fake_gpu.log] == ["jit", "direct", "direct"]
    assert all(e[2][9 + wi] != kw["w"].data_ptr() for e in fake_gpu.log[1:])
    kw = _args(n=40, b=2)
    kw["r"] = torch.ones(2)
    b = StepArgs(**kw)
    prog = _program(monkeypatch, b, [Reduction(rescale=0.7)])
    for _ in range(2):
        prog.run(0, mo)
    assert prog._fast == [None]  # a per-step reduction runs first: always the checked path


class _FakeTuner:
    """The autotuner: ``fn[grid_fn](*args, **flags)`` picks BLOCK 512 and launches the fake JIT kernel."""

    def __init__(self, jit):
        self.jit, self.tuned = jit, []
        self.best_config = types.SimpleNamespace(kwargs={"BLOCK": 512}, num_warps=4)

    def __getitem__(self, grid_fn):
        def launch(*args, **kwargs):
            self.tuned.append(args)
            return self.jit[grid_fn({"BLOCK": 512})](*args, **kwargs, BLOCK=512)
        return launch


def test_autotuning_runs_at_preparation_on_scratch_tensors(fake_gpu, monkeypatch):
    """FASTDIFF_TRITON_AUTOTUNE=1: each row is tuned when prepared, on scratch tensors of its shapes
    (the program's buffers untouched), and the loop's first step launches the tuned kernel directly."""
    tuner = _FakeTuner(fake_gpu)
    monkeypatch.setattr(K, "_tuned", tuner)
    monkeypatch.setenv("FASTDIFF_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(tb, "supports", lambda args: True)
    kw = _args(n=40, b=2)
    kw["out"] = kw["x"]  # in place: the alias is kept in the scratch copy
    a = StepArgs(**kw)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    steps = tb._PreparedSteps([a])
    assert len(tuner.tuned) == 1 and [e[0] for e in fake_gpu.log] == ["jit"]
    tuned = dict(zip(K._PARAMS, tuner.tuned[0]))
    mine = {id(t) for t in kw.values() if isinstance(t, torch.Tensor)} | {id(t) for t in kw["h_read"] + kw["h_write"]}
    assert not {id(t) for t in tuned.values() if isinstance(t, torch.Tensor)} & mine - {id(steps._table.row(0))}
    assert tuned["x_ptr"] is tuned["out_ptr"] and tuned["x_ptr"].shape == kw["x"].shape
    for k, v in before.items():
        assert torch.equal(kw[k], v), k
    steps(a)
    assert [e[0] for e in fake_gpu.log] == ["jit", "direct"] and len(tuner.tuned) == 1
    assert fake_gpu.log[1][2][0] == 1  # grid axis 0 from the tuned BLOCK: ceil(40 / 512)


@pytest.mark.skipif(K.INTERPRETED, reason="compiled kernels only (a GPU): the interpreter has none to launch directly")
def test_direct_launch_on_the_gpu(monkeypatch):
    """On a GPU: the second launch of a variant bypasses JITFunction.run and writes the same bits."""
    assert K.DIRECT, "the installed triton's launch differs from the direct path's: it is off"
    jit_calls = []
    real = K._step_kernel

    class Counting:
        def __getitem__(self, grid):
            jit_calls.append(grid)
            return real[grid]

    monkeypatch.setattr(K, "_step_kernel", Counting())
    monkeypatch.setattr(K, "_direct", {})
    monkeypatch.delenv("FASTDIFF_TRITON_AUTOTUNE", raising=False)
    pool, make_args, outputs = _pool(9, shape=(2, 3, 1000))
    first = _unprepared(pool, make_args, outputs, make_args(pool).coef)
    assert len(jit_calls) == 1 and len(K._direct) == 1
    second = _unprepared(pool, make_args, outputs, make_args(pool).coef)
    torch.cuda.synchronize()
    assert len(jit_calls) == 1, "the second launch went through JITFunction.run"
    _assert_bits(second, first, "direct launch")
    # a misaligned view: another compiled kernel through the JIT, then direct again
    flat = torch.randn(2 * 3000 + 1, device=DEVICE)
    x = flat[1:].view(2, 3000)
    coef = make_args(pool).coef
    for _ in range(2):
        K.fused_step(x, torch.empty_like(x), x.clone(), tuple(c if i != K.C_OUT + K.OP_Z else 0.0
                                                               for i, c in enumerate(coef)))
    assert len(jit_calls) == 2 and len(K._direct) == 2
