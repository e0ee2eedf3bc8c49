"""µs per model call of fastdiff.k_diffusion's SDE samplers with their default noise (a torchsde
Brownian tree, k-diffusion's own) and with ``noise="philox"`` (in-kernel), beside k-diffusion's
own function, interleaved (A B C A B C ...) so that load affects all three alike.

Run: ``python benchmarks/k_diffusion_noise.py [steps=20] [rounds=9]`` (needs k-diffusion and torchsde).
A zero-cost model (one fixed tensor) leaves each sampler's own cost.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

from fastdiff import k_diffusion as K
from fastdiff.bench.loop import k_module

SHAPE = (4, 4, 64, 64)
SAMPLERS = ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_sde")


def main(steps: int = 20, rounds: int = 9) -> None:
    warnings.simplefilter("ignore")  # torchsde's "Should have ta>=t0" with float32 sigmas (k-diffusion's too)
    ks = k_module("sampling")
    sig = ks.get_sigmas_karras(steps, 0.0292, 14.61)
    x = torch.randn(SHAPE) * sig[0]
    out = torch.randn(SHAPE)

    def model(u, s):
        return out

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {SHAPE}, {steps} Karras steps, "
          f"{rounds} interleaved rounds; us per model call, median (min)")
    for name in SAMPLERS:
        calls = 2 * steps - 1 if name == "sample_dpmpp_sde" else steps
        runs = {"brownian": lambda: getattr(K, name)(model, x, sig, disable=True, noise="brownian"),
                "philox": lambda: getattr(K, name)(model, x, sig, disable=True, noise="philox"),
                "k-diffusion": lambda: getattr(ks, name)(model, x, sig, disable=True)}
        t = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(rounds):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                t[k].append((time.perf_counter() - t0) / calls * 1e6)
        print(f"{name:22s}", "  ".join(f"{k}: {statistics.median(v):9.1f} ({min(v):.1f})" for k, v in t.items()))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
