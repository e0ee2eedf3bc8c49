"""The row contract is written once: fastdiff.core.args states the packed coefficient layout and the
pointer order; every compiled or generated copy (the CPU extension, the CUDA extension built for
the CPU emulation, the Triton kernel) is checked against it, and a build that disagrees is refused."""

from __future__ import annotations

import os
import re
import types

import pytest

from fastdiff.core import args
from fastdiff.backends import cpu
from fastdiff.core.plan import MAX_READS, MAX_WRITES, N_OPERANDS

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


def test_layout_is_consistent_in_python():
    o = args.COEF_OFFSETS
    assert o["out"] == 2 and o["write0"] == o["out"] + N_OPERANDS and o["write1"] == o["write0"] + N_OPERANDS
    assert [o[k] for k in ("known_a", "known_s", "c_g", "u_scale")] == list(range(o["write1"] + N_OPERANDS,
                                                                                 o["n_coef"]))
    assert args.N_COEF == o["n_coef"] == 30
    assert len(args.PTR_NAMES) == len(set(args.PTR_NAMES)) == 25
    assert args.PTR_NAMES[-4:] == ("m_2", "m_3", "a", "m_w")  # the blend operands, appended
    assert args.PTR_NAMES.index("h_read[0]") + MAX_READS == args.PTR_NAMES.index("h_write[0]")
    assert args.PTR_NAMES.index("h_write[0]") + MAX_WRITES == args.PTR_NAMES.index("z")


@pytest.mark.skipif(cpu._C is None, reason="fastdiff._C is not built")
def test_cpu_extension_states_the_same_layout():
    assert dict(cpu._C.COEF_OFFSETS) == args.COEF_OFFSETS
    assert tuple(cpu._C.PTR_NAMES) == args.PTR_NAMES
    assert cpu._C.N_COEF == args.N_COEF


def test_headers_state_the_same_layout():
    # the two C++ headers that spell numbers out (each checked against the other by static_assert)
    with open(os.path.join(CSRC, "step_params.h")) as f:
        assert int(re.search(r"constexpr int N_COEF = (\d+);", f.read()).group(1)) == args.N_COEF
    with open(os.path.join(CSRC, "step_math.h")) as f:
        assert f"static_assert(N_COEF == {args.N_COEF} && C_U == N_COEF - 1" in f.read()
    with open(os.path.join(CSRC, "bind_args.h")) as f:
        text = f.read()
    names = re.search(r"PTR_NAMES\[N_PTRS\] = \{(.*?)\};", text, re.S).group(1)
    assert tuple(re.findall(r'"([^"]+)"', names)) == args.PTR_NAMES
    with open(os.path.join(CSRC, "cuda_bindings.cpp")) as f:  # the CUDA bindings use bind_args.h's, not a copy
        cuda = f.read()
    assert '#include "bind_args.h"' in cuda and "PTR_NAMES[" not in cuda.replace("fd_bind::PTR_NAMES", "")


def test_triton_kernel_imports_the_layout():
    from fastdiff.backends import triton as tb

    k = tb.kernels() if tb.available()[0] or not isinstance(tb._kernels, Exception) else None
    if k is None:
        pytest.skip("triton is not importable here")
    for name in ("N_COEF", "C_AX", "C_AE", "C_OUT", "C_W0", "C_W1", "C_KNOWN_A", "C_KNOWN_S", "C_G", "C_U"):
        assert getattr(k, name) is getattr(args, name) or getattr(k, name) == getattr(args, name), name


def test_a_stale_extension_is_refused_by_name():
    stale = types.SimpleNamespace(__name__="fastdiff._C", COEF_OFFSETS={**args.COEF_OFFSETS, "n_coef": 29},
                                  PTR_NAMES=args.PTR_NAMES[:19])
    with pytest.raises(ImportError, match="was built for another row layout.*rebuild it"):
        cpu.check_layout(stale)
    cpu.check_layout(types.SimpleNamespace(__name__="ok", COEF_OFFSETS=dict(args.COEF_OFFSETS),
                                           PTR_NAMES=list(args.PTR_NAMES)))
