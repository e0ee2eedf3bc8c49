"""Write ``tests/models/zoo/digits_reference.safetensors``: fixed inputs and the committed models' outputs.

    python scripts/digits_reference.py

Run after retraining (``scripts/train_digits.py``). ``tests/models/zoo/test_digits.py`` loads the
committed weights, feeds the stored inputs and compares with the stored outputs, so a change to
the weights, the architecture code or the loader shows up as a test failure.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fastdiff.models.zoo import digits as D  # noqa: E402

PATH = os.path.join(ROOT, "tests", "models", "zoo", "digits_reference.safetensors")


def main() -> int:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(12, *D.SHAPE, generator=g)
    t = torch.tensor([0.0, 0.5, 1.0, 10.0, 99.5, 250.0, 333.3, 500.0, 640.0, 750.0, 900.0, 999.0])
    cond = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, D.NULL, D.NULL])
    clean = torch.rand(12, *D.SHAPE, generator=g) * 2 - 1
    with torch.no_grad():
        out = {
            "x": x, "t": t, "cond": cond, "clean": clean,
            "denoiser": D.load_denoiser()(x, t, cond),
            "noisy_classifier": D.load_noisy_classifier()(x, t),
            "feature_classifier": D.load_feature_classifier()(clean),
            "features": D.load_feature_classifier().features(clean),
        }
    save_file({k: v.contiguous() for k, v in out.items()}, PATH)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
