"""Philox reference stream: known-answer vectors, per-sample keying, distribution."""

import math

import pytest
import torch

from fastdiff.core import rng


def test_philox_known_answers():
    # Random123 kat_vectors for philox4x32_10.
    z = torch.tensor(0)
    assert [int(v) for v in rng.philox4x32((z, z, z, z), (z, z))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.tensor(0xFFFFFFFF)
    assert [int(v) for v in rng.philox4x32((f, f, f, f), (f, f))] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    c = [torch.tensor(v) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    k = (torch.tensor(0xA4093822), torch.tensor(0x299F31D0))
    assert [int(v) for v in rng.philox4x32(tuple(c), k)] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_sample_noise_independent_of_batch_and_position():
    seeds = [int(s) for s in torch.randint(0, 2**62, (8,))]
    full = rng.randn((8, 3, 5, 7), seeds, row=4)
    alone = rng.randn((1, 3, 5, 7), [seeds[3]], row=4)
    assert torch.equal(full[3:4], alone)
    # an int seed keys sample b with seed + b
    s = seeds[0]
    assert torch.equal(rng.randn((8, 11), s)[3], rng.randn((1, 11), s + 3)[0])


def test_streams_rows_and_seeds_differ():
    a = rng.randn((2, 64), 1, row=0, stream=0)
    for other in (rng.randn((2, 64), 1, row=1), rng.randn((2, 64), 1, stream=1), rng.randn((2, 64), 3)):
        assert not torch.equal(a, other)


def test_large_seeds_and_counter_high_word():
    big = [2**64 - 1, 2**63, 2**63 - 1]
    bits = rng.philox_bits(big, 0, 0, 8)
    assert bits.shape == (3, 8) and int(bits.min()) >= 0 and int(bits.max()) < 2**32
    # the counter's high word is used for element groups >= 2**32 (checked directly)
    g = torch.tensor(2**32 + 5)
    hi = rng.philox4x32((g & 0xFFFFFFFF, g >> 32, torch.tensor(0), torch.tensor(0)), (torch.tensor(1), torch.tensor(0)))
    lo = rng.philox4x32((torch.tensor(5), torch.tensor(0), torch.tensor(0), torch.tensor(0)), (torch.tensor(1), torch.tensor(0)))
    assert [int(v) for v in hi] != [int(v) for v in lo]


def test_uniform_map_is_open_interval_and_exact():
    u = torch.tensor([0, 511, 512, 2**32 - 1], dtype=torch.int64)
    f = rng.uniform01(u)
    assert f.dtype == torch.float32
    assert float(f[0]) == 2.0**-24 and float(f[1]) == 2.0**-24 and float(f[2]) == 3 * 2.0**-24
    assert 0.0 < float(f.min()) and float(f.max()) < 1.0


def test_normals_have_unit_moments():
    z = rng.randn((4, 250_000), int(torch.randint(0, 2**40, ())), row=7).double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    # tails are present but bounded by the 2**-24 resolution of the uniform map
    assert float(z.abs().max()) < math.sqrt(-2 * math.log(2.0**-24)) + 1e-4
    # lag-1 correlation across lanes of one Philox block is absent
    zf = z.reshape(-1)
    assert abs(float((zf[1:] * zf[:-1]).mean())) < 5 / math.sqrt(n)


def test_expand_seeds_errors():
    with pytest.raises(ValueError, match="seed has 2 entries but the batch has 3"):
        rng.expand_seeds([1, 2], 3)
    with pytest.raises(TypeError, match="seed"):
        rng.expand_seeds(True, 3)


# --- the normal transform: the float32 arithmetic of csrc/philox.h, in torch -----------------------------


def _ulp_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got - exact| in float32 ulps of the exact value."""
    _, e = torch.frexp(exact.abs().clamp_min(2.0**-126))
    return float(((got.double() - exact).abs() / torch.ldexp(torch.ones_like(exact), e - 24)).max())


def test_sqrt_rn_is_correctly_rounded():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    x = torch.ldexp(torch.rand(1_000_000, generator=g) + 0.5, torch.randint(-100, 100, (1_000_000,), generator=g))
    u = torch.randint(0, 2**32, (1_000_000,), generator=g)
    x = torch.cat([x, rng.log_f32(rng.uniform01(u)) * -2.0, torch.tensor([2.0**-126, 1.0, 2.0, 3.0, 33.27106])])
    want = torch.from_numpy(np.sqrt(x.numpy()))  # IEEE sqrtss/sqrtps
    assert torch.equal(rng.sqrt_rn(x), want)


def test_log_and_sincos_are_accurate():
    u = torch.cat([torch.randint(0, 2**32, (1_000_000,), generator=torch.Generator().manual_seed(1)),
                   torch.tensor([0, 511, 512, 2**31, 2**32 - 512, 2**32 - 1])])
    f = rng.uniform01(u)
    assert _ulp_error(rng.log_f32(f), torch.log(f.double())) <= 1.0
    theta = f * rng._TWO_PI_F
    s, c = rng.sincos_f32(theta)
    assert _ulp_error(s, torch.sin(theta.double())) <= 2.0
    assert _ulp_error(c, torch.cos(theta.double())) <= 2.0


def test_box_muller_edge_words_reach_the_tails():
    # f(0) = 2**-24 (the largest radius), f(2**32 - 1) = 1 - 2**-24 (the smallest); angles 0+ and 2π-
    edges = torch.tensor([0, 1, 511, 512, 2**31 - 1, 2**31, 2**32 - 513, 2**32 - 512, 2**32 - 1])
    u0, u1 = edges[:, None].expand(9, 9).reshape(-1), edges[None, :].expand(9, 9).reshape(-1)
    n0, n1 = rng.box_muller(u0, u1)
    r = torch.sqrt(-2 * torch.log(rng.uniform01(u0).double()))
    theta = (rng.uniform01(u1) * rng._TWO_PI_F).double()  # the angle is rounded to float32 by specification
    for got, want in ((n0, r * torch.cos(theta)), (n1, r * torch.sin(theta))):
        assert float(((got.double() - want).abs() / want.abs().clamp_min(1.0)).max()) <= 4 * 2.0**-23
    rmax = math.sqrt(-2 * math.log(2.0**-24))
    assert abs(float(torch.maximum(n0.abs(), n1.abs()).max()) - rmax) <= 1e-6 * rmax
