"""DPM-Solver-1, -2 and -3 singlestep steps as k-diffusion's ``DPMSolver`` writes them (Lu et al.
2022, https://arxiv.org/abs/2206.00927), and its PID step-size controller: the maths of
``sample_dpm_fast`` and ``sample_dpm_adaptive`` (run by :mod:`fastdiff.k_diffusion`).

k-diffusion steps in ``t = -log sigma`` with the noise estimate ``eps = (x - D) / sigma`` of a
denoiser ``D``. A step from ``t`` to ``t_next`` (``h = t_next - t``, ``sigma_k = exp(-s_k)``) is
one row per model evaluation; ``X`` is the step's start state, ``E = eps(X, t)``::

    order 1:  x' = X - sigma_n expm1(h) E
    order 2:  u1 = X - sigma_1 expm1(r1 h) E                                   (s1 = t + r1 h)
              x' = X - sigma_n expm1(h) E - sigma_n / (2 r1) expm1(h) (eps(u1, s1) - E)
    order 3:  u1 as above (r1 = 1/3), u2 = X - sigma_2 expm1(r2 h) E
                   - sigma_2 (r2 / r1) (expm1(r2 h) / (r2 h) - 1) (eps(u1, s1) - E)   (s2 = t + r2 h, r2 = 2/3)
              x' = X - sigma_n expm1(h) E - sigma_n / r2 (expm1(h) / h - 1) (eps(u2, s2) - E)

Each row's state operand is the point the model saw (``X``, ``u1``, ``u2``) and its output is the
next one. The first row keeps its model output ``D0`` in slot :data:`SLOT_D0`; later rows read it
and ``X`` (slot :data:`SLOT_X`, which no row writes) and use ``E = (X - D0) / sigma_0`` multiplied
out, so that ``X``'s coefficient, ``1 - sigma_n expm1(h) / sigma_0 + ...`` (about ``exp(-h)``), is
computed in float64: with ``E`` as an operand, ``X + c E`` cancels in float32 (k-diffusion's own
arithmetic) and loses ``exp(h)`` ulps, ~1e-6 relative for the long steps of ``eta = 1``. With
``low=True`` a step also writes the embedded lower-order estimate that ``sample_dpm_adaptive``
compares with it (order 1 inside order 2, order 2 with ``r1 = 1/3`` inside order 3) to slot
:data:`SLOT_LOW`, and their difference ``x' - low`` to slot :data:`SLOT_DIFF` as a combination of
noise-estimate differences, ``q (E - eps2) - p (E - eps1)`` (order 3, the second term kept in slot
:data:`SLOT_CORR`) or ``p (E - eps1)`` (order 2): both estimates carry ``X``, and subtracting the
two rounded states would leave mostly their rounding.

The evaluation points ``s1``, ``s2`` and every ``sigma_k`` are computed as k-diffusion computes them,
in the precision of its ``t`` tensors (``dtype``, float32 for float inputs), so the model sees
k-diffusion's sigmas exactly; the coefficients are then computed in float64 from those values.
Not a registered sampler: ``sample_dpm_adaptive`` chooses every step's size at run time, so the
host loop asks for one step's rows at a time.
"""

from __future__ import annotations

import math

import torch

from ..core.plan import Row, Write, combo

SLOT_X, SLOT_D0, SLOT_LOW, SLOT_CORR, SLOT_DIFF = 0, 1, 2, 3, 4
"""History slots: the step's start state ``X`` (read only), the first model output ``D0``, the
lower-order estimate, its correction ``p (E - eps1)`` (order 3) and the difference of the two estimates."""


def _phi1m1(h: float) -> float:
    """``expm1(h) / h - 1``, with its limit 0 at ``h = 0`` (k-diffusion divides 0 by 0 there: NaN)."""
    return math.expm1(h) / h - 1.0 if h else 0.0


def _form(sig0: float, sig: float | None, x: float = 0.0, e: float = 0.0, eps: float = 0.0,
          corr: float = 0.0) -> tuple[float, ...]:
    """Row coefficients of ``x X + e E + eps (state - d) / sig + corr CORR``, with ``E = (X - D0) / sig0``.

    ``sig=None``: the first row, whose state is ``X`` and whose ``d`` is ``D0`` (``eps`` is ``E``);
    else a later row reading ``(X, D0[, CORR])`` (``corr`` given) from the history.
    """
    if sig is None:
        return combo(x=x + (e + eps) / sig0, d=-(e + eps) / sig0)
    h = (x + e / sig0, -e / sig0) + ((corr,) if corr else ())
    return combo(x=eps / sig, d=-eps / sig, h=h)


def _point(sigma: float, step: int, stage: int, **kw) -> Row:
    """A row whose model (a denoiser: ``d`` is its output) is evaluated at noise level ``sigma``."""
    return Row(t=sigma, sigma=sigma, in_scale=1.0, a_x=0.0, a_e=1.0, alpha_t=1.0, sigma_t=sigma, step=step,
               stage=stage, **kw)


def step_rows(t: float, t_next: float, order: int, *, low: bool = False, z: float | None = None, step: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[Row, ...]:
    """The rows of one DPM-Solver step of ``order`` (1, 2 or 3) from ``t`` to ``t_next`` (see the module docstring).

    ``t``, ``t_next``: values of k-diffusion's ``t`` tensors, in ``dtype``. ``low``: also write the
    embedded lower-order estimate to :data:`SLOT_LOW` and ``x' - low`` to :data:`SLOT_DIFF` (orders
    2 and 3). ``z``: the last row draws noise and adds ``z`` times it to ``x'`` (``0.0``: draws and
    adds nothing, as k-diffusion calls its noise sampler with ``eta = 0``); ``None``: no noise. Each
    row's ``t`` and ``sigma`` are the noise level the model gets.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if low and order == 1:
        raise ValueError("an order-1 step has no lower-order estimate (low=True needs order 2 or 3)")
    tt, tn = torch.tensor(t, dtype=dtype), torch.tensor(t_next, dtype=dtype)
    hh = tn - tt
    r1, r2 = (1 / 3, 2 / 3) if order == 3 else (1 / 2, None)
    s1, s2 = tt + r1 * hh, (tt + r2 * hh if r2 else None)  # k-diffusion's evaluation points, in its precision
    sig0, sig_n = float(tt.neg().exp()), float(tn.neg().exp())
    h = float(hh)
    a = sig_n * math.expm1(h)  # every order: x' = X - a E - ...
    noise = {} if z is None else {"noise": True}
    if order == 1:
        return (_point(sig0, step, 0, out=_with_z(_form(sig0, None, x=1.0, eps=-a), z), **noise),)
    sig1, r1h = float(s1.neg().exp()), float(r1 * hh)
    keep = [Write(SLOT_D0, combo(d=1.0))]
    if low and order == 2:  # DPM-Solver-1 from the same evaluation
        keep.append(Write(SLOT_LOW, _form(sig0, None, x=1.0, eps=-a)))
    first = _point(sig0, step, 0, out=_form(sig0, None, x=1.0, eps=-sig1 * math.expm1(r1h)), writes=tuple(keep))
    reads = (SLOT_X, SLOT_D0)
    p = sig_n / (2 * r1) * math.expm1(h)  # DPM-Solver-2: x' = X - a E - p (eps1 - E)
    if order == 2:
        out = _form(sig0, sig1, x=1.0, e=p - a, eps=-p)
        diff = (Write(SLOT_DIFF, _form(sig0, sig1, e=p, eps=-p)),) if low else ()  # p (E - eps1)
        return first, _point(sig1, step, 1, out=_with_z(out, z), reads=reads, writes=diff, **noise)
    sig2, r2h = float(s2.neg().exp()), float(r2 * hh)
    b = sig2 * math.expm1(r2h)
    k = sig2 * (r2 / r1) * _phi1m1(r2h)
    q = sig_n / r2 * _phi1m1(h)  # DPM-Solver-3: x' = X - a E - q (eps2 - E)
    out2, out3 = _form(sig0, sig1, x=1.0, e=k - b, eps=-k), _form(sig0, sig2, x=1.0, e=q - a, eps=-q)
    if not low:
        return (first, _point(sig1, step, 1, out=out2, reads=reads),
                _point(sig2, step, 2, out=_with_z(out3, z), reads=reads, **noise))
    keep = (Write(SLOT_LOW, _form(sig0, sig1, x=1.0, e=p - a, eps=-p)),
            Write(SLOT_CORR, _form(sig0, sig1, e=p, eps=-p)))
    diff = Write(SLOT_DIFF, _form(sig0, sig2, e=q, eps=-q, corr=-1.0))  # q (E - eps2) - p (E - eps1)
    return (first, _point(sig1, step, 1, out=out2, reads=reads, writes=keep),
            _point(sig2, step, 2, out=_with_z(out3, z), reads=(*reads, SLOT_CORR), writes=(diff,), **noise))


def _with_z(out: tuple[float, ...], z: float | None) -> tuple[float, ...]:
    return out if z is None else out[:-1] + (float(z),)


def noise_row(z: float) -> Row:
    """``x' = x + z * noise``: ``sample_dpm_adaptive``'s noise, added once a step is accepted (no model call)."""
    return Row(t=0.0, sigma=0.0, in_scale=1.0, a_x=0.0, a_e=0.0, out=combo(x=1.0, z=z), noise=True)


class PIDStepSize:
    """k-diffusion's ``PIDStepSizeController``: a PID controller of the step size ``h`` from the
    step errors (Söderlind's digital filters; ``pcoeff=0, icoeff=1, dcoeff=0`` is the elementary
    controller ``h *= (1 / error) ** (1 / order)``, through the limiter ``1 + atan(f - 1)``).
    Host arithmetic in float64, operation for operation as k-diffusion's."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float = 1,
                 accept_safety: float = 0.81, eps: float = 1e-8) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        """Update ``h`` from this step's ``error`` (a scaled norm; ``<= 1`` is within tolerance) and
        return whether the step is accepted."""
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept
