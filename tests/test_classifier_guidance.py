"""Classifier guidance: the gradient term of the fused step gives Tweedie's conditional mean exactly."""

import pytest
import torch

import fastdiff
from fastdiff.runtime.loop import LoopOptions, classifier_coefficients, run_plan
from fastdiff.models import GaussianMixture
from fastdiff.core.plan import Plan, Row, combo, x0_coeffs


def _x0_row(pred, alpha, sigma):
    a_x, a_e = x0_coeffs(pred, alpha, sigma)
    return Row(t=0.5, sigma=sigma / alpha, in_scale=1.0, a_x=a_x, a_e=a_e, out=combo(d=1.0),
               alpha_t=alpha, sigma_t=sigma)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
def test_gradient_term_gives_the_component_posterior_mean(pred):
    # For a Gaussian mixture, p(k | u) is exact, and E[x0 | u, k] is component k's posterior mean.
    # With scale 1, classifier guidance must turn E[x0 | u] into exactly that (Tweedie).
    gm = GaussianMixture.default((3, 2), components=4, seed=int(torch.randint(0, 100, ())))
    alpha = float(torch.rand(()) * 0.8 + 0.1)
    sigma = (1 - alpha**2) ** 0.5
    plan = Plan((_x0_row(pred, alpha, sigma),), init_scale=1.0, steps=1, prediction=pred)
    model = gm.model(lambda t: (torch.full_like(t, alpha, dtype=torch.float64),
                                torch.full_like(t, sigma, dtype=torch.float64)), pred)
    u = torch.randn(6, 3, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))

    def classifier(uu, t):
        return gm.component_logits(uu, torch.tensor(alpha), torch.tensor(sigma))

    out = run_plan(plan, model, u.clone(), LoopOptions(backend="reference", classifier=classifier,
                                                         classifier_scale=1.0, classifier_y=y))
    mu = gm.means[y]
    s2 = (gm.stds[y] ** 2).reshape(-1, 1, 1)
    want = mu + alpha * s2 / (alpha**2 * s2 + sigma**2) * (u - alpha * mu)
    # Tweedie's conditional mean, up to the float64 cancellation of the softmax gradient itself
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-7)
    # and the fused term is exactly E[x0|u] + sigma^2/alpha * grad log p(y|u)
    uu = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(classifier(uu, None), 1).gather(1, y[:, None]).sum(), uu)
    a_t = torch.full((6,), alpha, dtype=torch.float64)
    direct = gm.denoise(u, a_t, torch.full((6,), sigma, dtype=torch.float64)) + sigma**2 / alpha * g
    assert torch.allclose(out, direct, rtol=1e-12, atol=1e-12)


def test_scale_is_an_inverse_temperature_and_combines_with_cfg():
    gm = GaussianMixture.default((2,))
    plan = fastdiff.make_plan("ddim", 10, {"clip_sample": False}, "eps")
    assert all(r.alpha_t is not None for r in plan.rows)
    c1 = classifier_coefficients(plan, 1.0)
    c3 = classifier_coefficients(plan, 3.0)
    assert all(abs(b - 3 * a) <= 1e-12 * abs(b) for a, b in zip(c1, c3))
    sched = fastdiff.core.schedules.from_config({"clip_sample": False})
    model = gm.model(sched.alpha_sigma, "eps")

    def classifier(u, t):
        a, s = sched.alpha_sigma(t)
        return gm.component_logits(u, torch.as_tensor(a), torch.as_tensor(s))

    noise = torch.randn(64, 2, dtype=torch.float64)
    target = torch.full((64,), 2)
    probs = []
    for scale in (0.0, 1.0, 4.0):
        x = fastdiff.sample(lambda u, t, c=None: model(u, t), noise, plan=plan, seed=1, backend="reference",
                            classifier=classifier, classifier_scale=scale, classifier_y=target,
                            guidance_scale=1.5, cond=torch.zeros(64, 1), uncond=torch.zeros(64, 1))
        lp = gm.component_logits(x, torch.ones(64), torch.full((64,), 1e-3)).softmax(1)[:, 2]
        probs.append(float(lp.mean()))
    assert probs[0] < probs[1] < probs[2]


def test_classifier_guidance_argument_errors():
    plan = fastdiff.make_plan("ddim", 3, {"clip_sample": False})
    with pytest.raises(ValueError, match="classifier_y"):
        fastdiff.sample(lambda x, t: x, torch.randn(2, 3), plan=plan, backend="reference",
                        classifier=lambda u, t: u[:, :2], classifier_y=torch.zeros(3, dtype=torch.int64))


def test_eps_estimate_plans_shift_eps_by_minus_sigma_grad():
    # UniPC with predict_x0=False carries eps in d (plan.estimate == "eps"): guidance must
    # give eps - sigma * s * grad, the eps of Tweedie's conditional mean
    gm = GaussianMixture.default((4,), components=3, seed=1)
    alpha, sigma, scale = 0.7, (1 - 0.49) ** 0.5, 2.5
    row = Row(t=0.5, sigma=sigma / alpha, in_scale=1.0, a_x=0.0, a_e=1.0, out=combo(d=1.0), alpha_t=alpha,
              sigma_t=sigma)
    plan = Plan((row,), init_scale=1.0, steps=1, prediction="eps", estimate="eps")
    ab = (torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    model = gm.model(lambda t: (ab[0].expand(t.shape), ab[1].expand(t.shape)), "eps")
    u = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))

    def classifier(uu, t):
        return gm.component_logits(uu, *ab)

    out = run_plan(plan, model, u.clone(), LoopOptions(backend="reference", classifier=classifier,
                                                         classifier_scale=scale, classifier_y=y))
    uu = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(classifier(uu, None), 1).gather(1, y[:, None]).sum(), uu)
    assert torch.allclose(out, model(u, torch.zeros(5)) - sigma * scale * g, rtol=1e-12, atol=1e-12)
