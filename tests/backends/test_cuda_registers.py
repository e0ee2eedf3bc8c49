"""The CUDA step kernel's register budget on sm_90, from ``ptxas -v`` (no GPU needed; skipped without nvcc).

Registers decide how many threads an SM keeps resident, and so how well a memory-bound kernel
hides latency: the one generic kernel that preceded the variants took 126 registers for fp32 (146
for fp16/bf16, 180 for fp64 blend rows), a quarter of an H100 SM's threads. csrc/cuda_step.cu now
dispatches each row to a variant specialised on its shape of work (see the comment at its top);
this test holds every specialised variant (the common rows: guided or not, up to two history
reads and writes, no noise, Philox or external noise; clip, u and flag at run time) to at most 64
registers (96 for fp64) with no spill, and checks that the general fallbacks compile. The
specialised variants keep several 16-byte chunks in flight per thread (UNROLL in the kernel: 1-4,
by variant and storage width), each as many as fits that budget: 56-64 registers for fp32, 60-64
for fp16/bf16, 70-80 for fp64 (their target: 3 blocks of 256 per SM) with nvcc 13.0, so a change
that costs registers shows here as a spill; lower that variant's UNROLL entry then. It also
bounds the number of kernels, which is what the CUDA build's time grows with.

One architecture (sm_90), setup.py's flags with warnings as errors, compile only: the session's one
compile of it (tests/backends/_nvcc.py), which test_cuda_compile.py checks for warnings too; about
25 s on two cores.
"""

from __future__ import annotations

import os
import re

import pytest

from ._nvcc import CSRC, NVCC, step_sm90

MAX_REGS = {"f": 64, "6__half": 64, "13__nv_bfloat16": 64, "d": 96}
"""Register budget of a specialised variant per storage type (Itanium-mangled name in the kernel's symbol)."""
MAX_KERNELS = 64
"""Step kernels compiled per architecture (today 4 storage types x 14 variants): the build's time."""


def _variant_bits() -> dict[str, int]:
    """The K_* bits of csrc/cuda_step.cu, read from the source so that this test follows it."""
    with open(os.path.join(CSRC, "cuda_step.cu")) as f:
        src = f.read()
    decl = re.search(r"constexpr unsigned (K_CFG = [^;]*);", src)
    assert decl, "csrc/cuda_step.cu no longer declares the K_* variant bits"
    return {name: int(value) for name, value in re.findall(r"(K_\w+) = (\d+)", decl.group(1))}


def _ptxas_report(out: str) -> dict[tuple[str, int], dict[str, int]]:
    """(storage, K) -> registers, spill stores, spill loads, stack frame of each step_kernel<S, K>."""
    kernels: dict[tuple[str, int], dict[str, int]] = {}
    current = None
    for line in out.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            k = re.search(r"step_kernelI(f|d|6__half|13__nv_bfloat16)Lj(\d+)E", m.group(1))
            current = (k.group(1), int(k.group(2))) if k else None
            if current:
                kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed; the CUDA kernel is compiled in CI")
def test_specialised_variants_fit_the_register_budget_on_sm90():
    cmd, rc, out, _ = step_sm90()  # (compiled once per session: test_cuda_compile.py reads it too)
    assert rc == 0, f"{' '.join(cmd)}\n{out[-4000:]}"
    kernels = _ptxas_report(out)
    assert all({"registers", "spill_stores", "spill_loads"} <= set(v) for v in kernels.values()), kernels

    bits = _variant_bits()
    noise = (0, bits["K_PHILOX"], bits["K_ZEXT"])
    specialised = sorted({c | h | z for c in (0, bits["K_CFG"]) for h in (0, bits["K_HIST"]) for z in noise})
    general = [bits["K_GENERAL"], bits["K_GENERAL"] | bits["K_BLEND"]]
    assert len(specialised) == 12
    table = "\n".join(f"{s:>16} K={k:<3} {v}" for (s, k), v in sorted(kernels.items()))
    over = []
    for storage, budget in MAX_REGS.items():
        for k in specialised + general:
            assert (storage, k) in kernels, f"step_kernel<{storage}, {k}> was not compiled:\n{table}"
        for k in specialised:
            v = kernels[storage, k]
            if v["registers"] > budget or v["spill_stores"] or v["spill_loads"]:
                over.append(f"step_kernel<{storage}, K={k}>: {v} (budget {budget} registers, no spill)")
    assert not over, "\n".join(over) + f"\n\nevery variant:\n{table}"
    assert len(kernels) <= MAX_KERNELS, f"{len(kernels)} step kernels (at most {MAX_KERNELS}: the build's time)"
