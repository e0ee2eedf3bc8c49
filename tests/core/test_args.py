"""fastdiff.core.args: the packed row layout kernels read, written once, and the estimate fold."""

import random

import pytest
import torch

from fastdiff.core.args import (C_AE, C_AX, C_G, C_KNOWN_A, C_KNOWN_S, C_OUT, C_U, C_W0, C_W1, CLIP_DYNAMIC,
                                CLIP_NONE, CLIP_STATIC, COEF_OFFSETS, N_COEF, PTR_NAMES, clip_code, compute_dtype,
                                fold_estimate, pack_row)
from fastdiff.core.plan import N_OPERANDS, OP_D, OP_E, OP_X, Row, Write, combo

from .._fixtures import _one_thread, seed  # noqa: F401  (fixtures, found by name)


def _random_row(rng: random.Random, clip=None, writes=2) -> Row:
    def vec():
        return combo(x=rng.uniform(-2, 2), d=rng.uniform(-2, 2), e=rng.uniform(-2, 2),
                     h=tuple(rng.uniform(-1, 1) for _ in range(2)), z=rng.uniform(0, 1))
    return Row(t=rng.uniform(0, 999), sigma=rng.uniform(0.1, 10), in_scale=rng.uniform(0.1, 1),
               a_x=rng.uniform(-3, 3), a_e=rng.uniform(-3, 3), out=vec(), reads=(0, 1),
               writes=tuple(Write(k, vec()) for k in range(writes)), clip=clip, noise=True,
               known_a=rng.uniform(0, 1), known_s=rng.uniform(0, 1))


def test_offsets_tile_the_packed_row_without_gaps():
    spans = sorted((COEF_OFFSETS[k], n) for k, n in [("a_x", 1), ("a_e", 1), ("out", N_OPERANDS),
                                                     ("write0", N_OPERANDS), ("write1", N_OPERANDS),
                                                     ("known_a", 1), ("known_s", 1), ("c_g", 1), ("u_scale", 1)])
    pos = 0
    for off, n in spans:
        assert off == pos
        pos += n
    assert pos == N_COEF == COEF_OFFSETS["n_coef"]
    assert len(set(PTR_NAMES)) == len(PTR_NAMES)


@pytest.mark.parametrize("writes", [0, 1, 2])
def test_pack_row_places_every_field(seed, writes):
    row = _random_row(random.Random(seed), writes=writes)
    c = pack_row(row, c_g=0.75, u_scale=0.5)
    assert len(c) == N_COEF
    assert (c[C_AX], c[C_AE], c[C_KNOWN_A], c[C_KNOWN_S], c[C_G], c[C_U]) == \
        (row.a_x, row.a_e, row.known_a, row.known_s, 0.75, 0.5)
    assert c[C_OUT:C_OUT + N_OPERANDS] == row.out
    w = [wr.coef for wr in row.writes] + [(0.0,) * N_OPERANDS] * (2 - writes)
    assert c[C_W0:C_W0 + N_OPERANDS] == w[0] and c[C_W1:C_W1 + N_OPERANDS] == w[1]


def test_fold_gives_the_same_combination_without_d(seed):
    rng = random.Random(seed)
    row = _random_row(rng)
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    d = row.a_x * x + row.a_e * e
    folded = fold_estimate(row.out, row.a_x, row.a_e)
    assert folded[OP_D] == 0.0
    want = row.out[OP_X] * x + row.out[OP_D] * d + row.out[OP_E] * e
    torch.testing.assert_close(folded[OP_X] * x + folded[OP_E] * e, want, rtol=1e-12, atol=1e-12)
    packed = pack_row(row, fold=True)
    assert packed[C_OUT:C_OUT + N_OPERANDS] == folded
    assert packed[C_W0 + OP_D] == 0.0 and packed[C_AX] == row.a_x  # a_x/a_e still give d itself


def test_fold_leaves_clipped_and_langevin_rows_alone(seed):
    row = _random_row(random.Random(seed), clip="static")
    assert pack_row(row, fold=True) == pack_row(row)


def test_clip_codes_and_compute_dtypes():
    rng = random.Random(0)
    assert [clip_code(_random_row(rng, clip=c)) for c in (None, "static", "dynamic")] == \
        [CLIP_NONE, CLIP_STATIC, CLIP_DYNAMIC]
    assert compute_dtype(torch.float64) == torch.float64
    assert all(compute_dtype(d) == torch.float32 for d in (torch.float32, torch.float16, torch.bfloat16))
