"""The sampling loop with a guider (:mod:`fastdiff.guiders`): every plan row's guidance branches
evaluated, blended and stepped by ONE fused step per row.

Per row: the branches the guider's blend needs at that step (:meth:`fastdiff.guiders.Guider.blend`)
are evaluated, those that share the model in one batched call (``[uncond; cond]`` or ``[cond]``),
the perturbed branch by ``perturbed_model`` (a separate call); the blend's per-sample coefficients
come from one Gram pass over the branches where the guider needs data (CFG-Zero*, APG, tangential,
magnitude-aware, guidance rescale); then the row's fused step blends the branches (and updates
APG's momentum buffer) and runs the solver update. The momentum buffer starts at zero each run.

This loop runs rows one by one on the host (the executor's prepared programs, CUDA graphs and
model-input writes do not cover blend rows yet); callbacks, inpainting, img2img, classifier
guidance and ``post_step`` are not taken here (:func:`fastdiff.sample` refuses them with
``guidance=``, naming them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.args import StepArgs, clip_code, pack_row
from ..core.guidance import dynamic_threshold
from ..core.plan import Plan
from .apply import coefficients
from ..core.args import C_OUT
from ..core.plan import OP_E
from .methods import COND, MOMENTUM, PERTURBED, UNCOND, Guider, StepBlend, constant
from ..runtime import ops
from ..runtime.executor import Cond, NonFiniteError, call_model, cat_cond, draw_noise


def run_guided(plan: Plan, model: Callable, x: torch.Tensor, guider: Guider, *, cond: Cond, uncond: Cond,
               perturbed_model: Callable | None, seeds: Sequence[int] | None, generator, backend: str,
               check_finite: bool = True, progress: bool = False, interval: tuple[float, float] | None = None,
               classifier: Callable | None = None, classifier_scale: float = 1.0,
               classifier_y: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``plan`` from the state ``x`` (already scaled by ``plan.init_scale``) with ``guider``;
    returns the final state (a new tensor). ``seeds`` (one per sample) draw Philox noise in the
    kernel; ``generator`` draws it as diffusers does, per noisy row. ``interval`` ``(sigma_lo,
    sigma_hi)``: the guider blends only where the row's sigma lies inside (elsewhere the conditional
    branch alone is evaluated). ``classifier``: classifier guidance on top of the blend (the gradient
    term ``e += c_g g`` of the row, as :func:`fastdiff.sample`'s classifier guidance)."""
    if any(r.out_u or r.write_u_slot is not None for r in plan.rows) and (guider.uses_momentum or guider.rescale):
        raise ValueError(f"{plan.sampler} is a CFG++ sampler: its guider may not keep a momentum buffer or rescale "
                         "(the step's second blend keeps the unconditional estimate)")
    b, dev, dt = x.shape[0], x.device, x.dtype
    x = x.clone().contiguous()
    hist = [torch.zeros_like(x) for _ in range(plan.n_slots)]
    momentum = torch.zeros_like(x) if guider.uses_momentum else None
    seed_t = torch.as_tensor(list(seeds), dtype=torch.int64).to(dev) if seeds is not None else None
    t_dt = torch.float64 if dt == torch.float64 else torch.float32
    flags = torch.zeros(len(plan.rows), dtype=torch.int32, device=dev) if check_finite else None
    steps = plan.steps or (max(r.step for r in plan.rows) + 1 if plan.rows else 0)
    rows = plan.rows
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="fastdiff", total=len(plan.rows))
    cg = None
    if classifier is not None:
        from ..runtime.row_terms import classifier_coefficients

        cg = classifier_coefficients(plan, classifier_scale)
    for name in guider._weights():  # one value per step, as guidance_scale's list (not silently cut short)
        v = getattr(guider, name)
        if isinstance(v, tuple) and len(v) != steps:
            raise ValueError(f"{type(guider).__name__}.{name} has {len(v)} entries but the plan has {steps} steps")
    blends = []  # every row's blend first: scheduled weights and branch needs are checked before any model call
    for r in plan.rows:
        inside = interval is None or interval[0] <= r.sigma <= interval[1]
        blends.append(guider.at(r.step, r.sigma).blend(r.step, steps) if inside else None)
    _check_branches(plan, blends, cond, uncond, perturbed_model)
    for i, r in enumerate(rows):
        sb = blends[i]
        need = (COND,) if sb is None else sb.branches
        u = x * r.in_scale
        out = _evaluate(model, perturbed_model, u, r, need, cond, uncond, b, t_dt, dev, dt)
        z = None
        if r.noise and generator is not None:
            z = draw_noise(x.shape, generator, torch.float32, dev).to(dt).contiguous()
        grad = None
        if cg is not None and cg[i] != 0.0:
            from ..runtime.row_terms import classifier_grad

            grad = classifier_grad(classifier, u, torch.full((b,), r.t, dtype=t_dt, device=dev),
                                   classifier_y).to(dt).contiguous()
        coef = pack_row(r, cg[i] if grad is not None else 0.0, fold=True)
        clip = clip_code(r)
        m_w = momentum if sb is not None and sb.write is not None else None
        if r.out_u or r.write_u_slot is not None:  # CFG++: the unconditional estimate re-noises (and is kept)
            sb = cfgpp_blend(sb, r, coef, i)
            m_w = hist[r.write_u_slot] if r.write_u_slot is not None else None
        if sb is None:
            slots, a = [out[COND], None, None, None], None
        else:
            named = dict(out)
            named[MOMENTUM] = momentum
            slots = [None if s is None else named[s] for s in sb.slots]
            a = coefficients(sb, slots, guider.rescale, extension=backend != "reference")
        s = _clip_bound(plan, r, x, slots, a, coef, clip, b, dev, grad)
        args = StepArgs(x=x, out=x, m=slots[0], m_c=slots[1], m_2=slots[2], m_3=slots[3], a=a, m_w=m_w, coef=coef,
                        row=i,
                        h_read=tuple(hist[k] for k in r.reads), h_write=tuple(hist[w.slot] for w in r.writes),
                        seeds=seed_t, z=z, clip=clip, s=s, g=grad, flag=flags[i:i + 1] if flags is not None else None)
        ops.step(args, backend=backend, check=i == 0)  # (later rows: the same tensors, and the loop's own buffers)
    if flags is not None:  # the kernels flag non-finite branch reads on the device: one check, after the loop
        bad = flags.nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            r = plan.rows[i]
            raise NonFiniteError(f"model output has NaN or Inf at step {r.step} (row {i}, sigma {r.sigma:.6g})")
    return x


def _check_branches(plan: Plan, blends: list[StepBlend | None], cond: Cond, uncond: Cond,
                    perturbed_model: Callable | None) -> None:
    """Refuse, before any model call, a run whose rows need a branch it cannot evaluate: the unconditional
    branch without ``uncond`` (or without ``cond``: both halves would be the same prediction), the perturbed
    branch without ``perturbed_model``, LTX-2's modality branch, or a CFG++ row whose blend has no
    unconditional branch."""
    for i, (r, sb) in enumerate(zip(plan.rows, blends)):
        need = () if sb is None else sb.branches
        if UNCOND in need and uncond is None:
            raise ValueError(f"the guider blends the unconditional branch (from step {r.step}): give uncond= "
                             "(the unconditional conditioning); without it the conditioning would be dropped")
        if UNCOND in need and cond is None:
            raise ValueError(f"the guider blends the unconditional branch (from step {r.step}): give cond= as well "
                             "as uncond=; without it both halves would be the unconditional prediction")
        if PERTURBED in need and perturbed_model is None:
            raise ValueError(f"the guider needs the perturbed branch at step {r.step}: give perturbed_model=")
        if "modality" in need:
            raise ValueError("LTX-2's modality branch is not evaluated by fastdiff.sample; blend it with "
                             "fastdiff.guiders.guide")
        if (r.out_u or r.write_u_slot is not None) and sb is not None and UNCOND not in sb.slots[:3]:
            raise ValueError(f"CFG++ row {i}: the guider's blend at step {r.step} has no unconditional branch "
                             f"({plan.sampler} re-noises along it)")


def cfgpp_blend(sb: StepBlend | None, r, coef, i: int) -> StepBlend:
    """A CFG++ row's blend (:mod:`fastdiff.samplers.cfgpp`): the guider's, moved toward the unconditional
    branch so that ``C_e e' = C_e e + out_u a_e (e_u - e)`` (``C_e`` the packed ``e`` weight of ``x'``),
    with the unconditional branch written by the second blend where the row keeps it
    (``write_u_slot``). With guidance off at the row (``sb`` ``None``), ``e_u = e``: the conditional
    branch, written where kept."""
    keep = (1.0, 0.0, 0.0, 0.0) if r.write_u_slot is not None else None
    if sb is None:
        return StepBlend((COND, None, None, None), constant(1.0), write=keep)
    if UNCOND not in sb.slots[:3]:
        raise ValueError(f"CFG++ row {i}: the guider's blend at step {r.step} has no unconditional branch")
    k = sb.slots.index(UNCOND)
    c_e = coef[C_OUT + OP_E]
    if r.out_u and c_e == 0.0:
        raise ValueError(f"CFG++ row {i}: its update has no e term to carry the unconditional estimate")
    lam = r.out_u * r.a_e / c_e if r.out_u else 0.0
    base = sb.plain
    if getattr(base, "weights", None) is not None:  # stays a host constant
        w = [v * (1.0 - lam) for v in base.weights]
        w[k] += lam
        plain = constant(*w)
    else:
        def plain(stats, b, device):
            p = base(stats, b, device) * (1.0 - lam)
            p[:, k] += lam
            return p
    keep = None if keep is None else tuple(1.0 if j == k else 0.0 for j in range(4))
    return StepBlend(sb.slots, plain, needs_stats=sb.needs_stats, write=keep)


def _evaluate(model, perturbed_model, u, r, need, cond, uncond, b, t_dt, dev, dt) -> dict[str, torch.Tensor]:
    """The branches ``need`` of one row: ``{name: [B, ...] tensor}`` (contiguous, the state's dtype)."""
    out: dict[str, torch.Tensor] = {}
    shared = [n for n in (UNCOND, COND) if n in need]
    if shared:
        conds = {UNCOND: uncond, COND: cond}
        c = conds[shared[0]]
        for n in shared[1:]:
            c = cat_cond(c, conds[n]) if c is not None else None
        k = len(shared)
        t = torch.full((k * b,), r.t, dtype=t_dt, device=dev)
        y = _tensor(call_model(model, u.repeat(k, *([1] * (u.dim() - 1))), t, c), (k * b, *u.shape[1:]), r, dt, dev)
        for j, n in enumerate(shared):
            out[n] = y[j * b:(j + 1) * b]
    if PERTURBED in need or "modality" in need:
        if PERTURBED in need:
            if perturbed_model is None:
                raise ValueError(f"the guider needs the perturbed branch at step {r.step}: give perturbed_model=")
            t = torch.full((b,), r.t, dtype=t_dt, device=dev)
            out[PERTURBED] = _tensor(call_model(perturbed_model, u, t, cond), tuple(u.shape), r, dt, dev)
        if "modality" in need:
            raise ValueError("LTX-2's modality branch is not evaluated by fastdiff.sample; blend it with "
                             "fastdiff.guiders.guide")
    return {k: v.contiguous() for k, v in out.items()}


def _tensor(y, want, r, dt, dev) -> torch.Tensor:
    from ..models.denoisers import unwrap_output

    y = unwrap_output(y)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(y).__name__}")
    if tuple(y.shape) != tuple(want):
        raise ValueError(f"model output at step {r.step} has shape {tuple(y.shape)}, expected {tuple(want)}")
    return y.detach().to(dtype=dt, device=dev)


def _clip_bound(plan, r, x, slots, a, coef, clip, b, dev, grad=None) -> torch.Tensor | None:
    """The clip bound ``s`` of a clipping row: the plan's static bound, or the dynamic threshold of
    the row's data estimate computed from the blended prediction (the reference backend's blend)."""
    if clip == 0:
        return None
    if clip == 1:
        return torch.full((b,), float(plan.clip_range), dtype=torch.float32, device=dev)
    from ..backends.reference import blended_output
    from ..core.args import C_AE, C_AX, C_G, compute_dtype

    cdt = compute_dtype(x.dtype)
    if a is None:
        e = slots[0].to(cdt)
    else:
        e, _ = blended_output(StepArgs(x=x, out=x, m=slots[0], m_c=slots[1], m_2=slots[2], m_3=slots[3], a=a,
                                       coef=coef), cdt)
    if grad is not None:
        e = e + coef[C_G] * grad.to(cdt)
    return dynamic_threshold(coef[C_AX] * x.to(cdt) + coef[C_AE] * e, plan.threshold_ratio, plan.threshold_max)
