"""The terms of a row that the step kernel does not compute itself, computed on the host side of
the row in torch: classifier-guidance coefficients and gradients, a Langevin corrector row's
operands (score, step size, scaled noise) and the data estimate handed to callbacks. Below the
executor and the op layer, which both use them; depends on neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import validate
from ..core.args import StepArgs, compute_dtype, pack_row
from ..core.guidance import guided_output
from ..core.plan import Plan, Row, combo


def classifier_coefficients(plan: Plan, scale: float) -> list[float]:
    """Per row ``c_g`` with ``e += c_g * g`` shifting the data estimate by ``scale * sigma_t^2/alpha_t * g``.

    ``g = grad_u log p(y | u)`` at the model input ``u = alpha_t x0 + sigma_t eps``, so by Tweedie's
    formula the data estimate moves from ``E[x0|u]`` to ``E[x0|u, y]`` (Dhariwal & Nichol 2021's
    ``eps - sqrt(1 - abar) * s * grad`` for eps models), with the scale ``s`` as inverse temperature.
    """
    out = []
    eps_estimate = plan.estimate == "eps"
    for r in plan.rows:
        if r.alpha_t is None or r.sigma_t is None:
            raise ValueError(f"sampler {plan.sampler!r} does not give alpha_t/sigma_t on its rows; "
                             "classifier guidance needs them")
        if r.a_e == 0.0 or r.alpha_t <= 0.0:
            out.append(0.0)  # the data estimate does not depend on the model output here
            continue
        # d is x0 (shift sigma^2/alpha * g), or eps for estimate="eps" plans (shift -sigma * g)
        shift = -r.sigma_t if eps_estimate else r.sigma_t**2 / r.alpha_t
        out.append(float(scale) * shift / r.a_e)
    return out


def classifier_grad(classifier: Callable, u: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``grad_u log softmax(classifier(u, t))[y]`` per sample (autograd; the classifier returns logits)."""
    # inference_mode(False): under torch.inference_mode() (a common way to call a sampler) autograd
    # records nothing and inference tensors cannot be saved for backward, so fresh copies are used
    with torch.inference_mode(False), torch.enable_grad():
        uu = u.detach().to(compute_dtype(u.dtype)).clone().requires_grad_(True)
        if t.is_inference():
            t = t.clone()
        if y.is_inference():
            y = y.clone()
        logits = classifier(uu, t)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != u.shape[0]:
            raise ValueError(f"classifier must return logits [B, classes], got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        validate.check_classes(y, logits.shape[1])
        logp = torch.log_softmax(logits.to(uu.dtype), dim=1).gather(1, y[:, None]).sum()
        (g,) = torch.autograd.grad(logp, uu)
    return g


_NOISE_ROW = Row(t=0.0, sigma=0.0, in_scale=1.0, a_x=0.0, a_e=0.0, out=combo(z=1.0), noise=True)
"""A row whose output is its own Philox noise (used to draw a Langevin row's noise)."""


def langevin_step_operands(x, m, m_c, w, rr, grad, coef, z, seeds, i: int, l_x: float, l_e: float, snr: float,
                           batch_norm: bool, step: Callable[[StepArgs], None]):
    """Operands of a Langevin corrector row in torch (the CPU extension runs such a row itself:
    ``_C.Program``'s ``run_langevin``).

    Computes the score ``g = l_x x + l_e e`` of the fully guided model output (``l`` from
    :func:`fastdiff.core.plan.score_coeffs`), draws ``z`` where the kernel would (Philox stream 0 at
    row ``i``, through ``step``, unless given), and the step ``k[b] = 2 (snr ||z[b]|| / ||g[b]||)^2``
    with norms per sample or their batch means (``batch_norm``), in the order diffusers'
    ``step_correct`` uses. Returns ``(m, r, z, coef)`` for the kernel: ``m = g``, ``r = k`` (float32
    ``[B]``), ``z = sqrt(2k) z`` and ``coef`` without the classifier term (``g`` already holds it),
    so the row's ``out = combo(x=1, e=1, z=1)`` gives ``x' = x + k g + sqrt(2k) z``.
    """
    from ..core.args import C_G

    dt = compute_dtype(x.dtype)
    b, nd = x.shape[0], x.dim()
    col = (-1,) + (1,) * (nd - 1)
    e = guided_output(m, m_c, w, rr, grad, coef[C_G], dt)
    g = l_e * e if l_x == 0.0 else l_x * x.to(dt) + l_e * e
    if z is None:  # the row's Philox noise, drawn by the step backend itself (x' = z): one fast pass
        buf = torch.zeros_like(x)  # finite operands: 0 * x must be 0
        step(StepArgs(x=buf, out=buf, m=buf, coef=pack_row(_NOISE_ROW), row=i, seeds=seeds))
        z = buf
    z = z.to(dt)
    g_norm = torch.linalg.vector_norm(g.reshape(b, -1), dim=-1)
    z_norm = torch.linalg.vector_norm(z.reshape(b, -1), dim=-1)
    if batch_norm:
        g_norm, z_norm = g_norm.mean().expand(b), z_norm.mean().expand(b)
    k = (snr * z_norm / g_norm) ** 2 * 2
    zk = ((k * 2) ** 0.5).reshape(col) * z
    coef = coef[:C_G] + (0.0,) + coef[C_G + 1:]
    return g.to(x.dtype), k.to(torch.float32).contiguous(), zk.to(x.dtype), coef


def x0_estimate(x, m, m_c, w, rr, row, s=None, clip=0) -> torch.Tensor:
    """The row's data estimate in float32 (for callbacks)."""
    nd = x.dim()
    e = m.float()
    if m_c is not None:
        e = e + w.reshape((-1,) + (1,) * (nd - 1)) * (m_c.float() - e)
    if rr is not None:
        e = rr.reshape((-1,) + (1,) * (nd - 1)) * e
    d = row.a_x * x.float() + row.a_e * e
    if clip:
        sb = s.reshape((-1,) + (1,) * (nd - 1))
        d = torch.minimum(torch.maximum(d, -sb), sb)
        if clip == 2:
            d = d / sb
    return d
