"""The plan: the contract between samplers and step kernels.

A sampler turns a discretization into a :class:`Plan`, a list of :class:`Row`. Every row is one
model evaluation followed by one fused, element-wise step. For element ``i`` of sample ``b``::

    e  = m                                  # model output (no guidance), or
    e  = m_u + w[b] * (m_c - m_u)           # classifier-free guidance (w per sample)
    e  = r[b] * e                           # optional guidance-rescale factor (per sample)
    e  = e + c_g * g                        # optional classifier-guidance gradient term
    d  = a_x * x + a_e * e                  # data estimate x0 from any parameterization
    d  = clamp(d, -s[b], s[b])              # optional static clip / dynamic threshold ...
    d  = d / s[b]                           # ... which also divides (dynamic thresholding)
    z  = N(0, 1)                            # Philox(seed[b], row, stream 0, i), or an external tensor
    v  = [x, d, e, H[reads[0]], ..., H[reads[k-1]], z]
    x' = out · v                            # solver update
    x' = mask*x' + (1-mask)*(known_a*known + known_s*z2)   # optional; z2 = Philox stream 1
    H[writes[j].slot] = writes[j].coef · v  # history ring written for later rows
    u  = in_scale' * x'  (once, or twice: [u; u]) # the next row's model input, written by the same pass
    flag |= any non-finite m, m_c read           # recorded by the kernel, reported after the loop

``H`` is a ring of ``plan.n_slots`` history buffers shaped like ``x``. A kernel reads every input
of an element before writing any output of it, so ``x'`` may overwrite ``x`` and a written slot
may also be read in the same row. ``in_scale'`` is the next row's ``in_scale`` and ``u`` holds two
copies when the next row is guided (the model is called once on ``[uncond; cond]``); the loop
(:mod:`fastdiff.runtime.executor`) packs it with the row (:func:`fastdiff.core.args.pack_row`), so one model
call and one kernel run per row is all the loop does.

All coefficients are float64 host scalars computed once when the plan is built; kernels compute
in float32 (float64 for float64 storage). The model is called as
``model(in_scale * x, t)``; ``sigma`` is the noise level of ``x`` for callbacks and guidance
schedules (the schedule's own noise level: k-diffusion's sigma for VP/VE, ``s`` for flow).

A Langevin corrector row (``Row.snr > 0``; Song et al. 2021, Algorithm 5) has a step size that
depends on the data: before the kernel the loop computes the score ``g = l_x x + l_e e`` of the
state (:func:`score_coeffs`, ``e`` fully guided), draws ``z``, sets
``k[b] = 2 (snr ||z[b]|| / ||g[b]||)^2`` (both norms averaged over the batch when
``plan.snr_norm == "batch"``, as Song et al. and diffusers do) and runs the row with ``e := k[b] g``
and ``z := sqrt(2 k[b]) z``; such a row's ``out`` is ``combo(x=1, e=1, z=1)``, so the update is
``x' = x + k g + sqrt(2k) z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_READS = 4
"""Most history slots one row may read."""
MAX_WRITES = 2
"""Most history slots one row may write."""
N_OPERANDS = 4 + MAX_READS
"""Length of a coefficient vector: x, d, e, MAX_READS history reads, z."""
OP_X, OP_D, OP_E, OP_H, OP_Z = 0, 1, 2, 3, 3 + MAX_READS
"""Operand positions in a coefficient vector (history reads start at ``OP_H``)."""

PREDICTIONS = ("eps", "v", "x0", "flow", "score")
"""Model parameterizations the plan can convert to a data estimate (``score``: ``grad_u log p_t(u)``)."""


def combo(x: float = 0.0, d: float = 0.0, h: tuple[float, ...] = (), z: float = 0.0,
          e: float = 0.0) -> tuple[float, ...]:
    """Build a coefficient vector over the operands ``[x, d, e, H[reads[0..]], z]``.

    ``h`` gives coefficients for the row's history reads in the order of ``Row.reads``; ``e`` is
    the (guided) model output itself, for updates that mix a clipped data estimate with the
    unclipped model output (diffusers' DDIM default).
    """
    if len(h) > MAX_READS:
        raise ValueError(f"h has {len(h)} history coefficients; at most {MAX_READS} are allowed")
    hs = tuple(float(c) for c in h) + (0.0,) * (MAX_READS - len(h))
    return (float(x), float(d), float(e)) + hs + (float(z),)


@dataclass(frozen=True)
class Write:
    """One history write: ``H[slot] = coef · [x, d, e, H[reads...], z]``."""

    slot: int
    coef: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.coef) != N_OPERANDS:
            raise ValueError(f"Write.coef must have {N_OPERANDS} entries, got {len(self.coef)}")


@dataclass(frozen=True)
class Row:
    """One model evaluation and the fused step after it (see the module docstring).

    Attributes:
        t: value passed to the model as its timestep (diffusers timestep, sigma, or flow time).
        sigma: the schedule's own noise level at this evaluation (k-diffusion's sigma for VP and
            VE schedules, the flow sigma ``s`` in [0, 1] for flow schedules), for callbacks,
            guidance schedules and guidance intervals.
        in_scale: the model input is ``in_scale * x``.
        a_x, a_e: data estimate ``d = a_x * x + a_e * e``.
        out: coefficients of ``x'`` over ``[x, d, e, H[reads...], z]``.
        reads: history slots read, in operand order (at most ``MAX_READS``).
        writes: history writes (at most ``MAX_WRITES``).
        clip: ``None`` for no clipping, ``"static"`` to clamp ``d`` to ``±s`` or ``"dynamic"`` to
            clamp to ``±s[b]`` and divide by it. The loop supplies ``s``.
        known_a, known_s: with a mask, the known region becomes ``known_a*known + known_s*z2``.
        noise: whether the row consumes one draw of noise shaped like ``x``. In external-noise
            mode (a ``torch.Generator``) the loop draws exactly when the wrapped library does, even
            where the noise coefficient is 0 (diffusers' Euler ancestral at its last step).
        step: index of the solver step this row belongs to (several rows may share one step).
        stage: index of the row inside its step.
        alpha_t, sigma_t: the model input is ``u = alpha_t * x0 + sigma_t * eps`` at this row
            (``None`` where a sampler does not say); the loop needs them for classifier guidance
            (Tweedie: ``E[x0 | u, y] = E[x0 | u] + sigma_t**2 / alpha_t * grad log p(y | u)``).
        snr: ``> 0`` makes this a Langevin corrector row whose step is ``2 (snr ‖z‖/‖g‖)²`` (see the
            module docstring): the sampler's signal-to-noise ratio, times any factor it folds in
            (``pc`` on VP carries ``snr·√α_i``, Song et al.'s ``α_i = 1 − β_i``); needs ``noise``,
            ``alpha_t``/``sigma_t`` and ``out = combo(x=1, e=1, z=1)``.
        out_u: CFG++ (Chung et al. 2024): ``x'`` gains ``out_u * (d_u - d)``, ``d_u`` the data estimate
            of the unconditional branch alone (the re-noising uses the unconditional estimate). 0 for
            every other row; where guidance is off at the row, ``d_u = d`` and it has no effect. The
            loop folds it into the row's guidance scale (:func:`fastdiff.core.guidance.cfgpp_scale`), so
            such a row may not clip or write history from ``d`` or ``e``.
        write_u_slot: CFG++ multistep: the history slot that keeps this row's unconditional model
            output (written by the fused step's second blend, ``m_w``); ``None`` for every other row.
            Such plans run on the guided loop (:mod:`fastdiff.guiders.loop`).
    """

    t: float
    sigma: float
    in_scale: float
    a_x: float
    a_e: float
    out: tuple[float, ...]
    reads: tuple[int, ...] = ()
    writes: tuple[Write, ...] = ()
    clip: str | None = None
    known_a: float = 1.0
    known_s: float = 0.0
    noise: bool = False
    step: int = 0
    stage: int = 0
    alpha_t: float | None = None
    sigma_t: float | None = None
    snr: float = 0.0
    out_u: float = 0.0
    write_u_slot: int | None = None

    def __post_init__(self) -> None:
        if len(self.out) != N_OPERANDS:
            raise ValueError(f"Row.out must have {N_OPERANDS} entries, got {len(self.out)}")
        if len(self.reads) > MAX_READS:
            raise ValueError(f"Row.reads has {len(self.reads)} slots; at most {MAX_READS} allowed")
        if len(self.writes) > MAX_WRITES:
            raise ValueError(f"Row.writes has {len(self.writes)} entries; at most {MAX_WRITES} allowed")
        if self.clip not in (None, "static", "dynamic"):
            raise ValueError(f"Row.clip must be None, 'static' or 'dynamic', got {self.clip!r}")
        vals = (self.t, self.sigma, self.in_scale, self.a_x, self.a_e, *self.out, self.out_u)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"Row at step {self.step} stage {self.stage} has a non-finite coefficient")
        if self.out_u and (self.clip is not None or self.snr
                           or any(w.coef[OP_D] or w.coef[OP_E] for w in self.writes)):
            raise ValueError(f"CFG++ row at step {self.step} (out_u={self.out_u}) may not clip, be a Langevin row or "
                             "write history from d or e")

        if not self.noise and (self.out[-1] != 0.0 or any(w.coef[-1] != 0.0 for w in self.writes)):
            raise ValueError(f"row at step {self.step} has a noise coefficient but noise=False")
        if self.snr:
            if not (math.isfinite(self.snr) and self.snr > 0):
                raise ValueError(f"Row.snr must be a finite number >= 0, got {self.snr!r}")
            if not self.noise or self.alpha_t is None or self.sigma_t is None or self.clip is not None \
                    or self.writes or self.out != combo(x=1.0, e=1.0, z=1.0):
                raise ValueError(f"Langevin row at step {self.step} (snr={self.snr}) needs noise=True, alpha_t, "
                                 "sigma_t, no clip, no history writes and out=combo(x=1, e=1, z=1)")


@dataclass(frozen=True)
class Plan:
    """A whole sampling run: rows plus what the loop needs around them.

    Attributes:
        rows: one per model evaluation.
        init_scale: initial state is ``init_scale * noise`` (unit-variance noise).
        n_slots: size of the history ring the rows address.
        sampler: name of the sampler that built the plan.
        prediction: model parameterization the coefficients assume.
        steps: number of solver steps (rows may be more: multi-stage solvers).
        out_scale: the returned sample is ``out_scale * x`` after the last row.
        clip_range: static clip bound ``s`` for rows with ``clip="static"`` (diffusers'
            ``clip_sample_range``).
        threshold_ratio, threshold_max: dynamic thresholding (rows with ``clip="dynamic"``):
            ``s[b] = clamp(quantile(|d[b]|, ratio), 1, max)`` (diffusers' ``dynamic_thresholding_ratio``
            and ``sample_max_value``).
        noise_dtype: with a generator, draw noise in this dtype (then cast to the state's), as
            the mirrored library does (diffusers' DPM-Solver SDE always draws float32); ``None``
            draws in the state's dtype.
        estimate: what the rows' ``d = a_x * x + a_e * e`` estimates: ``"x0"`` (the data, every
            sampler but two) or ``"eps"`` (the noise: diffusers' noise-space DPM-Solver and UniPC
            with ``predict_x0=False``); classifier guidance shifts it accordingly.
        snr_norm: ``"batch"`` or ``"sample"``: Langevin rows (``Row.snr > 0``) take the batch
            means of the score and noise norms (Song et al., diffusers) or each sample's own
            (results independent of the batch).
        meta: free-form details for reports (not read by the loop or kernels).
    """

    rows: tuple[Row, ...]
    init_scale: float
    n_slots: int = 0
    sampler: str = ""
    prediction: str = "eps"
    steps: int = 0
    out_scale: float = 1.0
    clip_range: float = 1.0
    threshold_ratio: float = 0.995
    threshold_max: float = 1.0
    noise_dtype: str | None = None
    snr_norm: str = "batch"
    estimate: str = "x0"
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for r in self.rows:
            for s in (*r.reads, *(w.slot for w in r.writes), *(() if r.write_u_slot is None else (r.write_u_slot,))):
                if not 0 <= s < self.n_slots:
                    raise ValueError(f"row at step {r.step} addresses slot {s}; plan has {self.n_slots} slots")
        if self.snr_norm not in ("batch", "sample"):
            raise ValueError(f"Plan.snr_norm must be 'batch' or 'sample', got {self.snr_norm!r}")
        if self.estimate not in ("x0", "eps"):
            raise ValueError(f"Plan.estimate must be 'x0' or 'eps', got {self.estimate!r}")

    def __len__(self) -> int:
        return len(self.rows)


def check_prediction(prediction: str) -> str:
    """Return ``prediction`` normalised (diffusers' ``epsilon``/``sample``/``v_prediction`` accepted)."""
    aliases = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
    p = aliases.get(prediction, prediction)
    if p not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (or diffusers' names), got {prediction!r}")
    return p


def x0_coeffs(prediction: str, alpha: float, sigma: float, in_scale: float = 1.0) -> tuple[float, float]:
    """Coefficients ``(a_x, a_e)`` with ``x0 = a_x * x + a_e * model_output``.

    The model sees ``u = in_scale * x`` with ``u = alpha * x0 + sigma * eps`` (for ``flow``,
    ``alpha = 1 - t`` and ``sigma = t``). ``v`` follows diffusers: ``v = alpha*eps - sigma*x0`` with
    ``alpha**2 + sigma**2 = 1``; ``flow`` is the velocity ``eps - x0``; ``score`` is ``grad_u log p_t(u)
    = -eps / sigma``.
    """
    p = check_prediction(prediction)
    if p == "score":
        # score = grad_u log p(u) = -eps / sigma  =>  x0 = (u + sigma^2 score) / alpha
        if alpha == 0.0:
            raise ValueError("prediction 'score' gives no data estimate where alpha = 0")
        return in_scale / alpha, sigma * sigma / alpha
    if p == "eps":
        return in_scale / alpha, -sigma / alpha
    if p == "v":
        return alpha * in_scale, -sigma
    if p == "x0":
        return 0.0, 1.0
    # flow: u = (1-t) x0 + t eps, v = eps - x0  =>  x0 = u - t v
    return in_scale, -sigma


def score_coeffs(a_x: float, a_e: float, alpha: float, sigma: float, in_scale: float = 1.0) -> tuple[float, float]:
    """Coefficients ``(l_x, l_e)`` with ``grad_x log p_t(x) = l_x * x + l_e * e`` at a row whose data
    estimate is ``x0 = a_x * x + a_e * e`` and whose model input is ``u = in_scale * x = alpha * x0 +
    sigma * eps``: ``grad_x = in_scale * grad_u = in_scale * (alpha * x0 - u) / sigma^2`` (Tweedie).

    ``l_x`` is exactly 0 where the model output alone gives the score (``score``, ``eps``); there
    the rounding residue of ``alpha * a_x - in_scale`` is dropped.
    """
    if not sigma > 0:
        raise ValueError(f"the score needs sigma > 0, got sigma={sigma!r}")
    lx = alpha * a_x - in_scale
    if abs(lx) <= 4e-16 * abs(in_scale):
        lx = 0.0
    return in_scale * lx / (sigma * sigma), in_scale * alpha * a_e / (sigma * sigma)
