"""Hostile arguments to ``fastdiff.sample`` and ``fastdiff.Sampler``: each refused before any work
(no model call), with the right exception type and a message naming the argument, and no caller
tensor changed. Generated from tables: every argument crossed with its bad values."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.core import validate

B, SHAPE = 2, (2, 3, 4, 4)


class _Model:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, c=None):
        self.calls += 1
        return torch.tanh(x)


def _base():
    g = torch.Generator().manual_seed(0)
    return dict(noise=torch.randn(SHAPE, generator=g), cond=torch.randn(B, 5, generator=g),
                uncond=torch.randn(B, 5, generator=g))


NAN = float("nan")
BAD = [
    # (argument, value, exception, text the message must hold)
    ("seed", "12", TypeError, "seed"),
    ("seed", b"12", TypeError, "seed"),
    ("seed", 1.5, TypeError, "seed"),
    ("seed", True, TypeError, "seed"),
    ("seed", [1.5, 2], TypeError, "seed[0]"),
    ("seed", [1, "2"], TypeError, "seed[1]"),
    ("seed", [1, 2, 3], ValueError, "seed has 3 entries"),
    ("seed", 2**64, ValueError, "seed"),
    ("seed", 2**64 - 1, ValueError, "passes 2**64"),  # seed + 1 for the second sample wraps
    ("seed", -(2**63) - 1, ValueError, "seed"),
    ("seed", torch.tensor([1.0, 2.0]), TypeError, "seed"),
    ("seed", torch.tensor([1, 2, 3]), ValueError, "seed has 3 entries"),
    ("generator", "abc", TypeError, "generator"),
    ("generator", [torch.Generator(), 5], TypeError, "generator[1]"),
    ("generator", [torch.Generator()] * 3, ValueError, "generator list has 3 entries"),
    ("cond", [1, 2], TypeError, "cond"),
    ("cond", 3.0, TypeError, "cond"),
    ("cond", torch.randn(3, 5), ValueError, "cond must be [B, ...] with B = 2"),
    ("cond", torch.randn(()), ValueError, "cond must be [B, ...]"),
    ("cond", {"emb": torch.randn(3, 5)}, ValueError, "cond['emb']"),
    ("cond", {1: torch.randn(2, 5)}, TypeError, "cond keys"),
    ("uncond", "neg", TypeError, "uncond"),
    ("guidance_scale", "2222", TypeError, "guidance_scale"),
    ("guidance_scale", "75", TypeError, "guidance_scale"),
    ("guidance_scale", NAN, ValueError, "guidance_scale"),
    ("guidance_scale", 1e308, ValueError, "guidance_scale"),
    ("guidance_scale", float("inf"), ValueError, "guidance_scale"),
    ("guidance_scale", [2.0, NAN, 2.0], ValueError, "guidance_scale[1]"),
    ("guidance_scale", [2.0, "x", 2.0], TypeError, "guidance_scale[1]"),
    ("guidance_scale", [2.0, 2.0], ValueError, "guidance_scale has 2 entries"),
    ("guidance_scale", torch.tensor([2.0, 2.0]), ValueError, "guidance_scale has 2 entries"),
    ("guidance_scale", True, TypeError, "guidance_scale"),
    ("guidance_interval", (1.0,), TypeError, "guidance_interval"),
    ("guidance_interval", "ab", TypeError, "guidance_interval"),
    ("guidance_interval", (2.0, 1.0), ValueError, "guidance_interval"),
    ("guidance_interval", (NAN, 1.0), ValueError, "guidance_interval[0]"),
    ("guidance_interval", ("a", 1.0), TypeError, "guidance_interval[0]"),
    ("guidance_rescale", "0.5", TypeError, "guidance_rescale"),
    ("guidance_rescale", 1.5, ValueError, "guidance_rescale"),
    ("guidance_rescale", NAN, ValueError, "guidance_rescale"),
    ("callback", 5, TypeError, "callback"),
    ("post_step", 5, TypeError, "post_step"),
    ("classifier", 5, TypeError, "classifier"),
    ("plan", object(), TypeError, "plan"),
    ("steps", 10**12, ValueError, "steps"),
    ("steps", 0, ValueError, "steps"),
    ("steps", 2.5, TypeError, "steps"),
    ("steps", "10", TypeError, "steps"),
    ("sampler", 5, TypeError, "sampler"),
    ("sampler", None, TypeError, "sampler"),
    ("sampler", "bogus", ValueError, "unknown sampler 'bogus'"),
    ("schedule", 5, TypeError, "schedule"),
    ("schedule", "scaled_linear", TypeError, "schedule"),
    ("schedule", [0.1, 0.2], TypeError, "schedule"),
    ("prediction", "foo", ValueError, "prediction"),
    ("backend", "foo", ValueError, "backend"),
    ("check_finite", "no", TypeError, "check_finite"),
    ("check_finite", None, TypeError, "check_finite"),
    ("cuda_graph", "yes", TypeError, "cuda_graph"),
    ("progress", "yes", TypeError, "progress"),
    ("progress", 2, TypeError, "progress"),
]


@pytest.mark.parametrize("arg, value, exc, text", BAD, ids=[f"{a}={str(v)[:20]}" for a, v, _, _ in BAD])
@pytest.mark.parametrize("entry", ["sample", "sampler"])
def test_bad_argument_refused_by_name_before_any_work(arg, value, exc, text, entry):
    base = _base()
    before = {k: v.clone() for k, v in base.items()}
    model = _Model()
    kw = dict(sampler="euler_ancestral", steps=3, cond=base["cond"], uncond=base["uncond"], guidance_scale=2.0, seed=0)
    kw[arg] = value
    if arg == "generator":
        kw.pop("seed")
    if arg == "plan":
        kw.pop("sampler"), kw.pop("steps")
    build = ("steps", "plan", "guidance_scale", "guidance_interval", "guidance_rescale", "classifier", "schedule",
             "prediction", "backend", "check_finite", "cuda_graph")
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        if entry == "sample":
            fastdiff.sample(model, base["noise"], **kw)
        else:
            build_kw = {k: kw.pop(k) for k in list(kw) if k in (*build, "sampler")}
            s = fastdiff.Sampler(model, shape=SHAPE, **build_kw)
            s(base["noise"], **kw)
    assert model.calls == 0
    assert all(torch.equal(base[k], before[k]) for k in base)


@pytest.mark.parametrize("noise, exc, text", [
    ([1.0, 2.0], TypeError, "noise must be a torch.Tensor"),
    (torch.zeros(2, 3, dtype=torch.int64), TypeError, "noise must have a floating dtype"),
    (torch.zeros(0, 3), ValueError, "noise must be"),
    (torch.zeros(()), ValueError, "noise must be"),
    (torch.zeros(2, 3, device="meta"), ValueError, "noise is a meta tensor"),
    (torch.tensor([[0.0, NAN]]), ValueError, "noise contains NaN or Inf"),
    (torch.tensor([[0.0, float("inf")]]), ValueError, "noise contains NaN or Inf"),
])
def test_bad_noise(noise, exc, text):
    model = _Model()
    with pytest.raises(exc, match=text):
        fastdiff.sample(model, noise, sampler="euler", steps=3, seed=0)
    assert model.calls == 0


def test_bad_inpainting_inputs_are_named_not_blamed_on_the_model():
    base = _base()
    mask = torch.ones(B, 1, 4, 4)
    known = torch.randn(SHAPE)
    bad_mask = mask.clone()
    bad_mask[0, 0, 1, 1] = NAN
    bad_known = known.clone()
    bad_known[1, 2, 3, 3] = float("inf")
    for kw, text in ((dict(mask=bad_mask, known=known), "mask"), (dict(mask=mask, known=bad_known), "known")):
        model = _Model()
        with pytest.raises(ValueError, match=f"{text} contains NaN or Inf"):
            fastdiff.sample(model, base["noise"], sampler="euler", steps=3, seed=0, **kw)
        assert model.calls == 0
    # check_finite=False: the caller takes the responsibility, nothing is scanned
    out = fastdiff.sample(_Model(), base["noise"], sampler="euler", steps=3, seed=0, check_finite=False,
                          mask=mask, known=bad_known)
    assert out.shape == SHAPE


def test_guidance_with_uncond_but_no_cond_is_refused():
    base = _base()
    model = _Model()
    with pytest.raises(ValueError, match="needs cond .* as well as uncond"):
        fastdiff.sample(model, base["noise"], sampler="euler", steps=3, seed=0, guidance_scale=3.0,
                        uncond=base["uncond"])
    assert model.calls == 0
    # unguided: uncond alone is simply not used
    fastdiff.sample(model, base["noise"], sampler="euler", steps=3, seed=0, uncond=base["uncond"])


def test_classifier_y_out_of_range_is_named():
    base = _base()

    def classifier(u, t):
        return u.flatten(1)[:, :4] * 0.1  # 4 classes

    with pytest.raises(ValueError, match=r"classifier_y must be class indices in \[0, 4\)"):
        fastdiff.sample(lambda x, t: torch.tanh(x), base["noise"], sampler="ddim", steps=3, seed=0,
                        classifier=classifier, classifier_y=torch.tensor([1, 7]))


def test_a_callable_guidance_scale_returning_garbage_is_named():
    base = _base()
    with pytest.raises(TypeError, match=r"guidance_scale\(0,"):
        fastdiff.sample(_Model(), base["noise"], sampler="euler", steps=3, seed=0, cond=base["cond"],
                        uncond=base["uncond"], guidance_scale=lambda step, sigma: "7")


def test_valid_edge_values_still_run():
    base = _base()
    kw = dict(sampler="euler", steps=3, cond=base["cond"], uncond=base["uncond"])
    for seed in (0, 2**64 - 2, -(2**63), [2**64 - 1, -(2**63)], torch.tensor([3, 4]), torch.tensor(5)):
        fastdiff.sample(_Model(), base["noise"], seed=seed, **kw)
    for scale in (2, 2.5, torch.tensor(3.0), [1.0, 2.0, 3.0], torch.tensor([1.0, 2.0, 3.0]), lambda s, sg: 2.0):
        fastdiff.sample(_Model(), base["noise"], seed=0, guidance_scale=scale, **kw)
    fastdiff.sample(_Model(), base["noise"], seed=0, guidance_scale=2.0, guidance_interval=(0.0, float("inf")), **kw)
    assert validate.seeds(2**64 - 1, 1) == [-1]  # an unsigned 64-bit word, kept as its int64 bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_the_input_scan_finds_nan_and_inf_in_every_dtype(dtype):
    for n in (7, 3 * (1 << 20) + 5):  # one thread, and the parallel scan
        x = torch.randn(n).to(dtype)
        x[x.abs() > 3] = 0  # finite, but large values of each dtype stay
        x[0] = torch.finfo(dtype).max
        validate.finite("noise", x)
        for pos in (0, n // 2, n - 1):
            for bad in (float("nan"), float("inf"), -float("inf")):
                y = x.clone()
                y[pos] = bad
                with pytest.raises(ValueError, match="noise contains NaN or Inf"):
                    validate.finite("noise", y)


@pytest.mark.parametrize("arg", ["noise", "cond", "uncond", "mask", "known", "image", "classifier_y"])
def test_meta_tensors_are_refused_by_name(arg):
    """The public API refuses tensors without data by name (internal tests may drive the loop on meta)."""
    base = _base()
    model = _Model()
    kw = dict(noise=base["noise"], sampler="euler_ancestral", steps=3, seed=0)
    meta = {"classifier_y": torch.empty(B, dtype=torch.int64, device="meta")}.get(
        arg, torch.empty(SHAPE if arg in ("noise", "mask", "known", "image") else (B, 5), device="meta"))
    if arg in ("mask", "known"):
        kw.update(mask=torch.ones(SHAPE), known=torch.zeros(SHAPE))
    if arg == "image":
        kw["strength"] = 0.5
    if arg == "classifier_y":
        kw["classifier"] = lambda u, t: u.flatten(1)[:, :3]
    kw[arg] = meta
    with pytest.raises(ValueError, match=f"{arg} is a meta tensor"):
        fastdiff.sample(model, **kw)
    assert model.calls == 0
