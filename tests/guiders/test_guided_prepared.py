"""The guided loop's prepared rows (:mod:`fastdiff.guiders.loop`): rows packed, validated and resolved
once and kept between calls. A kept run must give what a fresh one gives, bit for bit (the state,
history, momentum buffer and flags start over; seeds and generators are the call's), whatever the
model does with its input (keeps it, returns it, returns a view of it), in and out of inference
mode and from several threads at once; and moving the branches into the program's slot layout
(:func:`fastdiff.guiders.loop.canonical_blend`) must not change the blend."""

from __future__ import annotations

import threading

import pytest
import torch

import fastdiff
from fastdiff.guiders import loop
from fastdiff.guiders.methods import APG, AutoGuidance, CFGZeroStar, Guider, Perturbed, TangentialCFG
from tests.samplers._harness import toy_model

SHAPE = (2, 3, 4, 5)
BACKENDS = ["reference", "cpu"]


def _backend(name: str) -> str:
    if name == "cpu":
        from fastdiff.backends import cpu

        if not cpu.available()[0]:
            pytest.skip("cpu extension not built")
    return name


def _models():
    f, pf = toy_model(5, SHAPE), toy_model(6, SHAPE, gain=0.8)

    def model(u, t, cond):
        return f(u, t) + 0.2 * cond

    def perturbed(u, t, cond):
        return 0.6 * f(u, t) + 0.4 * pf(u, t) + 0.2 * cond

    return model, perturbed


GUIDERS = {
    "apg_momentum": (APG(scale=5.0, momentum=-0.5, norm_threshold=2.0, eta=0.3), "dpmpp_2m"),
    "perturbed": (Perturbed(scale=4.0, perturbed_scale=2.0, perturbed_start=0.1, perturbed_stop=0.6), "euler"),
    "auto_guidance": (AutoGuidance(scale=3.0), "euler_ancestral"),
    "cfg_zero_star": (CFGZeroStar(scale=4.0), "dpmpp_2m_sde"),
    "cfg_rescale": (Guider(scale=6.0, rescale=0.6), "euler_ancestral"),
}


def _run(name, backend, noise, seed=0, generator=None, model=None):
    guider, sampler = GUIDERS[name]
    m, p = _models()
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(SHAPE, generator=g), torch.zeros(SHAPE)
    return fastdiff.sample(model or m, noise, sampler=sampler, steps=6, guidance=guider, cond=cond, uncond=uncond,
                           perturbed_model=p, backend=backend, seed=None if generator is not None else seed,
                           generator=generator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(GUIDERS))
def test_a_kept_run_gives_what_a_fresh_one_gives(name, backend):
    backend = _backend(backend)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    loop._runs.clear()
    first = _run(name, backend, noise)
    again = _run(name, backend, noise)  # the kept run: state, history and momentum start over
    other = _run(name, backend, noise, seed=5)
    back = _run(name, backend, noise)
    assert torch.equal(first, again) and torch.equal(first, back)
    assert again is not first and again.data_ptr() != first.data_ptr()  # a new tensor each call
    if GUIDERS[name][1] != "euler" and GUIDERS[name][1] != "dpmpp_2m":  # noisy samplers: the seed is the call's
        assert not torch.equal(first, other)
    assert loop._runs
    fastdiff.clear_cache()  # drops the kept runs (and their buffers)
    assert not loop._runs
    assert torch.equal(_run(name, backend, noise), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_noise_is_the_calls(backend):
    backend = _backend(backend)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    loop._runs.clear()
    a = _run("auto_guidance", backend, noise, generator=torch.Generator().manual_seed(7))
    b = _run("auto_guidance", backend, noise, generator=torch.Generator().manual_seed(8))
    c = _run("auto_guidance", backend, noise, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("habit", ["keeps", "returns_it", "returns_a_view"])
def test_what_the_model_does_with_its_input(habit, backend):
    """A model that keeps its input (a cache comparing inputs across steps), or returns it or a view of
    it (an identity model), gets what a model given fresh tensors gets, and what it kept is what it
    was given."""
    backend = _backend(backend)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    m, _ = _models()
    kept, copies = [], []

    def plain(u, t, cond):
        return m(u, t, cond) if habit == "keeps" else u.clone()

    def odd(u, t, cond):
        kept.append(u)
        copies.append(u.clone())
        if habit == "returns_it":  # an identity model, as tests and placeholders use
            return u
        if habit == "returns_a_view":
            return u[:]
        return m(u, t, cond)

    for name in ("apg_momentum", "perturbed"):
        loop._runs.clear()
        want = _run(name, backend, noise, model=plain)
        for _ in range(2):  # a fresh run, then the kept one
            kept.clear(), copies.clear()
            got = _run(name, backend, noise, model=odd)
            assert torch.equal(got, want), f"{name}: {habit}"
            if habit == "keeps":
                for k, c in zip(kept, copies):
                    assert torch.equal(k, c), f"{name}: an input the model kept was overwritten"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_then_not(backend):
    backend = _backend(backend)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    loop._runs.clear()
    with torch.inference_mode():
        a = _run("apg_momentum", backend, noise)
    b = _run("apg_momentum", backend, noise)  # the kept buffers are normal tensors
    with torch.inference_mode():
        c = _run("apg_momentum", backend, noise)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_concurrent_calls_each_get_their_own_run():
    backend = _backend("cpu")
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    want = [_run("perturbed", backend, n) for n in noises]
    got = [None] * 4

    def work(i):
        for _ in range(3):
            got[i] = _run("perturbed", backend, noises[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _zero_star_on_perturbed(step, steps):
    """A data-dependent blend with the perturbed branch first (CFG-Zero*'s optimal scale of the
    perturbed prediction): the layout moves it, so the statistics are permuted back for it."""
    from fastdiff.guiders.methods import StepBlend

    def plain(stats, b, device):
        g = stats.gram
        alpha = g[:, 1, 0] / (g[:, 0, 0] + 1e-8)
        p = stats.ops.zeros(b, g)
        p[:, 0], p[:, 1] = -2.0 * alpha, 3.0
        return p

    return StepBlend(("perturbed", "cond", None, None), plain, needs_stats=True)


@pytest.mark.parametrize("extension", [False, True], ids=["torch", "cpu_extension"])
@pytest.mark.parametrize("guider", [AutoGuidance(scale=3.0, original=True), TangentialCFG(scale=4.0),
                                    Perturbed(scale=1.0, perturbed_scale=2.5, perturbed_start=0.0, perturbed_stop=1.0),
                                    APG(scale=3.0, momentum=0.4, norm_threshold=1.5, eta=0.2),
                                    Guider(scale=4.0, rescale=0.5), "zero_star_on_perturbed"],
                         ids=["auto_guidance", "tangential", "perturbed_only", "apg", "rescale", "data_moved"])
def test_the_slot_layout_does_not_change_the_blend(guider, extension):
    """The blend in the program's slot layout is the guider's own blend: same prediction and same
    momentum update, from fresh random branches, with data-dependent and constant weights, the
    weights computed in torch and (from the CPU extension's statistics) in numpy."""
    from fastdiff.guiders.apply import coefficients
    from fastdiff.backends.reference import blended_output
    from fastdiff.core.args import N_COEF, StepArgs

    if extension:
        _backend("cpu")
    g = torch.Generator().manual_seed(0)
    branches = {k: torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
                for k in ("uncond", "cond", "perturbed", "momentum")}
    if guider == "zero_star_on_perturbed":
        sb, rescale = _zero_star_on_perturbed(2, 10), 0.0
    else:
        sb, rescale = guider.blend(2, 10), guider.rescale
    assert sb is not None
    layout = loop.canonical_blend(sb)

    def blend(s):
        slots = [None if k is None else branches[k] for k in s.slots]
        a = coefficients(s, slots, rescale, extension=extension)
        x = slots[0]
        args = StepArgs(x=x, out=x, m=slots[0], m_c=slots[1], m_2=slots[2], m_3=slots[3], a=a,
                        m_w=torch.empty_like(x) if s.write is not None else None, coef=(0.0,) * N_COEF)
        return blended_output(args, torch.float64)

    (e0, w0), (e1, w1) = blend(sb), blend(layout)
    torch.testing.assert_close(e1, e0, rtol=1e-6, atol=1e-6)
    if w0 is not None:
        torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-6)
    assert layout.slots[2] in (None, "perturbed") and layout.slots[3] in (None, "momentum")
    assert (layout is sb) == ("perturbed" not in sb.slots[:2])  # moved only where it had to be


def test_a_weight_given_as_a_function_is_called_every_run():
    """A scheduled weight ``f(step, sigma)`` may change between calls (it reads a setting): each run calls
    it anew, no kept run reuses its old values."""
    from fastdiff.guiders.methods import Guider as CFG

    m, _ = _models()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    cond, uncond = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)), torch.zeros(SHAPE)
    setting = {"w": 3.0}

    def weight(step, sigma):
        return setting["w"]

    g = CFG(scale=weight)

    def run(gd):
        return fastdiff.sample(m, noise, sampler="euler", steps=4, guidance=gd, cond=cond, uncond=uncond, seed=0)

    a = run(g)
    setting["w"] = 6.0
    b = run(g)
    assert torch.equal(b, run(CFG(scale=6.0))) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 0, 4), (3,), (1, 2, 3, 2, 2)], ids=["empty", "1d", "5d"])
def test_any_state_shape_runs(shape, backend):
    """An empty state (no elements per sample), a 1-D one and a 5-D one run with every kind of blend
    (constant, rescaled, data-dependent, momentum), as the classic guided path does: a state of
    their shape and dtype comes back (finite where there are elements)."""
    backend = _backend(backend)
    m, _ = _models()

    def model(u, t, cond):
        return torch.tanh(u) * 0.5 + 0.1 * cond

    g = torch.Generator().manual_seed(8)
    x, cond, uncond = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.zeros(shape)
    for guider in (Guider(scale=3.0), Guider(scale=3.0, rescale=0.5), CFGZeroStar(scale=3.0),
                   APG(scale=4.0, momentum=-0.5), TangentialCFG(scale=2.0)):
        out = fastdiff.sample(model, x, sampler="dpmpp_2m", steps=3, guidance=guider, cond=cond, uncond=uncond,
                              seed=1, backend=backend)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    out = fastdiff.sample(model, x, sampler="dpmpp_2m", steps=3, guidance_scale=3.0, cond=cond, uncond=uncond, seed=1,
                          backend=backend)  # (the classic executor's prepared program took no empty state either)
    assert out.shape == x.shape
