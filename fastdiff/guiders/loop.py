"""The sampling loop with a guider (:mod:`fastdiff.guiders`): every plan row's guidance branches
evaluated, blended and stepped by ONE fused step per row, the rows prepared once per call.

Per row: the branches the guider's blend needs at that step (:meth:`fastdiff.guiders.Guider.blend`)
are evaluated, those that share the model in one batched call (``[uncond; cond]`` or ``[cond]``),
the perturbed branch by ``perturbed_model`` (a separate call); the blend's per-sample coefficients
come from one Gram pass over the branches where the guider needs data (CFG-Zero*, APG, tangential,
magnitude-aware, guidance rescale); then the row's fused step blends the branches (and updates
APG's momentum buffer), runs the solver update and writes the next row's model input. The
momentum buffer starts at zero each run.

As :class:`fastdiff.runtime.executor.Executor` does for the classic loop, every row is packed,
validated and resolved to a backend once, before the first model call
(:func:`fastdiff.runtime.ops.prepare`: the CPU extension's program, or the backend's step), so a
row costs one model call (two with a perturbed branch), the blend coefficients where they depend on
the data, and one call into the program. Each row's slots are laid out as the program takes them:
the branches of the shared call in ``m`` and ``m_c`` (the two halves of its output, unconditional
first), the perturbed branch in ``m_2``, the momentum buffer in ``m_3``
(:func:`canonical_blend`). Callbacks, inpainting, img2img and ``post_step`` are not taken here
(:func:`fastdiff.sample` refuses them with ``guidance=``, naming them).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..core.args import C_OUT, StepArgs, clip_code, pack_row
from ..core.guidance import dynamic_threshold
from ..core.plan import OP_E, Plan
from ..runtime import ops
from ..runtime.executor import Cond, call_model, cat_cond, draw_noise, raise_flagged
from .apply import coefficients
from .methods import COND, DERIVED, MODALITY, MOMENTUM, PERTURBED, UNCOND, Guider, StepBlend, constant
from .stats import Stats, device_constant

_use_count = getattr(torch._C, "_storage_Use_Count", None)


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
    term ``e += c_g g`` of the row, as :func:`fastdiff.sample`'s classifier guidance).

    Everything but the model calls is checked before the first one: scheduled weights, the branches
    each row needs, every prepared row."""
    key = (plan, guider, tuple(x.shape), x.dtype, x.device, backend, bool(check_finite), interval,
           classifier is not None, float(classifier_scale), generator is not None, seeds is not None)
    if any(callable(getattr(guider, n)) for n in guider._weights()):
        key = None  # a weight given as f(step, sigma) is called anew every run (it may not return what it did)
    run = _take(key)
    if run is None:
        blends, cg = _row_blends(plan, guider, interval, classifier, classifier_scale)
        _check_branches(plan, blends, cond, uncond, perturbed_model)
        with torch.inference_mode(False):  # buffers kept for later calls must be normal tensors
            run = _GuidedRun(plan, x, guider, blends, cg, seeds=seeds, generator=generator, backend=backend,
                             check_finite=check_finite)
    else:
        _check_branches(plan, run.raw_blends, cond, uncond, perturbed_model)
    try:
        return run.run(model, perturbed_model, x, seeds=seeds, generator=generator, cond=cond, uncond=uncond,
                       progress=progress, classifier=classifier, classifier_y=classifier_y)
    finally:
        _keep(key, run)


CACHE_SIZE = 4
"""Prepared guided runs kept between calls (the last ones used), as :func:`fastdiff.sample` keeps
prepared loops: a repeated call skips packing, validating and resolving its rows. Each holds the
state, history, model input (twice the state's size) and momentum buffers of its configuration;
:func:`fastdiff.clear_cache` drops them."""

_runs: OrderedDict = OrderedDict()
_runs_lock = threading.Lock()


def _take(key) -> "_GuidedRun | None":
    """The kept run of ``key``, taken out of the cache (a concurrent call with the same key builds
    its own), or ``None``."""
    if key is None:
        return None
    try:
        hash(key)
    except TypeError:  # a guider weight or interval that cannot be keyed: no caching
        return None
    with _runs_lock:
        return _runs.pop(key, None)


def _keep(key, run: "_GuidedRun") -> None:
    if key is None:
        return
    try:
        hash(key)
    except TypeError:
        return
    with _runs_lock:
        _runs[key] = run
        _runs.move_to_end(key)
        while len(_runs) > CACHE_SIZE:
            _runs.popitem(last=False)


def _row_blends(plan: Plan, guider: Guider, interval, classifier, classifier_scale):
    """Every row's blend (``None`` where guidance is off) and classifier coefficients (``None``
    without a classifier), checked: CFG++ with a guider it cannot take, scheduled weights of the
    wrong length."""
    if any(r.out_u or r.write_u_slot is not None for r in plan.rows) and (guider.uses_momentum or guider.rescale):
        raise ValueError(f"{plan.sampler} is a CFG++ sampler: its guider may not keep a momentum buffer or rescale "
                         "(the step's second blend keeps the unconditional estimate)")
    steps = plan.steps or (max(r.step for r in plan.rows) + 1 if plan.rows else 0)
    for name in guider._weights():  # one value per step, as guidance_scale's list (not silently cut short)
        v = getattr(guider, name)
        if isinstance(v, tuple) and len(v) != steps:
            raise ValueError(f"{type(guider).__name__}.{name} has {len(v)} entries but the plan has {steps} steps")
    blends = []
    for r in plan.rows:
        inside = interval is None or interval[0] <= r.sigma <= interval[1]
        blends.append(guider.at(r.step, r.sigma).blend(r.step, steps) if inside else None)
    cg = None
    if classifier is not None:
        from ..runtime.row_terms import classifier_coefficients

        cg = classifier_coefficients(plan, classifier_scale)
    return blends, cg


class _GuidedRun:
    """One guided run's buffers and prepared rows (built before the first model call)."""

    def __init__(self, plan: Plan, x: torch.Tensor, guider: Guider, blends: list[StepBlend | None], cg,
                 *, seeds, generator, backend: str, check_finite: bool) -> None:
        b, dev, dt = x.shape[0], x.device, x.dtype
        self.plan, self.b, self.dev, self.dt = plan, b, dev, dt
        self.backend, self.cg, self.raw_blends = backend, cg, blends
        self.host_noise = generator is not None
        self.rescale = guider.rescale
        self.extension = backend != "reference"
        n = len(plan.rows)
        self.x = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.hist = hist = [torch.zeros_like(self.x) for _ in range(plan.n_slots)]
        self.momentum = torch.zeros_like(self.x) if guider.uses_momentum else None
        self.seeds = seed_t = torch.zeros(b, dtype=torch.int64, device=dev) if seeds is not None else None
        self.t_dt = torch.float64 if dt == torch.float64 else torch.float32
        self.flags = torch.zeros(n, dtype=torch.int32, device=dev) if check_finite else None
        self.s_buf = torch.ones(b, dtype=torch.float32, device=dev)
        self.s_static = torch.full((b,), float(plan.clip_range), dtype=torch.float32, device=dev)
        self.a_buf = {4: torch.zeros(4, b, dtype=torch.float32, device=dev),
                      8: torch.zeros(8, b, dtype=torch.float32, device=dev)}
        self.z_buf = torch.zeros_like(self.x) if self.host_noise else None
        self.g_buf = torch.zeros_like(self.x) if cg is not None else None
        # each row's blend, CFG++'s folded in and its slots laid out as the program takes them
        self.coefs, self.blends = [], []
        for i, r in enumerate(plan.rows):
            nxt = plan.rows[i + 1].in_scale if i + 1 < n else 1.0
            coef = pack_row(r, cg[i] if cg is not None else 0.0, fold=True, u_scale=nxt)
            sb = blends[i]
            if r.out_u or r.write_u_slot is not None:  # CFG++: the unconditional estimate re-noises (and is kept)
                sb = cfgpp_blend(sb, r, coef, i)
            self.coefs.append(coef)
            self.blends.append(canonical_blend(sb, i) if sb is not None else None)
        self.shared = [_shared(sb) for sb in self.blends]  # the branches of each row's batched call
        self.ts = {}  # each row's timestep tensors, one per (t, calls of k samples)
        for i, r in enumerate(plan.rows):
            for k in {len(self.shared[i]), 1}:
                if (r.t, k) not in self.ts:
                    self.ts[r.t, k] = torch.full((k * b,), r.t, dtype=self.t_dt, device=dev)
        self.kmax = max((len(s) for s in self.shared), default=1)
        self._new_input()
        # the buffers the step writes: a model output inside one is copied before the step reads it
        self.written = {t.untyped_storage().data_ptr() for t in (self.x, *hist, self.momentum) if t is not None}
        self.runs = 0
        rows = [self._args(i, hist, seed_t) for i in range(n)]
        self.rows = rows
        self.program = ops.prepare(rows, backend)
        self.run_ptr = getattr(self.program, "run_ptr", None)
        self.base = self._users()

    # -- buffers ---------------------------------------------------------------------------------

    def _new_input(self) -> None:
        """The model input buffer: ``[k B, ...]``, ``k`` the most branches a call evaluates. Each row's
        step writes the next row's input into its first ``k B`` samples."""
        self.inp = torch.empty((self.kmax * self.b, *self.x.shape[1:]), dtype=self.dt, device=self.dev)
        self.storage = self.inp.untyped_storage()
        self.inputs = [self.inp[:len(s) * self.b] for s in self.shared]  # each row's model input
        self.single = self.inp[:self.b]  # the perturbed call's input (the same values)

    def _users(self) -> int:
        return _use_count(self.storage._cdata) if _use_count is not None else 0

    def _renew_input(self) -> None:
        """Give the model input up (a model kept it, or returned a view of it) and point the rows at a
        new one, which the next step fills (as :meth:`fastdiff.runtime.executor._Workspace.renew_input`)."""
        self._new_input()
        for i, a in enumerate(self.rows):
            if a.u is not None:
                self.program.set(i, "u", self.inp[:a.u.shape[0]])
        self.base = self._users()

    def _args(self, i: int, hist, seed_t) -> StepArgs:
        """Row ``i`` as the program takes it: ``m``/``m_c`` stand in for the model output (``run``
        points them), ``m_2`` for the perturbed branch, ``a`` for data-dependent coefficients, ``z``
        and ``g`` for host-drawn noise and the classifier gradient (each pointed at per call)."""
        r, sb, x = self.plan.rows[i], self.blends[i], self.x
        clip = clip_code(r)
        n = len(self.plan.rows)
        u = self.inp[:len(self.shared[i + 1]) * self.b] if i + 1 < n else None
        grad = self.g_buf if self.cg is not None and self.cg[i] != 0.0 else None
        common = dict(x=x, out=x, coef=self.coefs[i], row=i, h_read=tuple(hist[k] for k in r.reads),
                      h_write=tuple(hist[w.slot] for w in r.writes), seeds=seed_t, z=self.z_buf if r.noise and self.host_noise else None,
                      g=grad, clip=clip, s=self.s_static if clip == 1 else self.s_buf if clip == 2 else None, u=u,
                      flag=self.flags[i:i + 1] if self.flags is not None else None)
        if sb is None:  # guidance off: the conditional branch alone
            return StepArgs(m=x, **common)
        if r.write_u_slot is not None:  # CFG++ 2M keeps the unconditional estimate in its history slot
            m_w = hist[r.write_u_slot]
        else:
            m_w = self.momentum if sb.write is not None else None
        slot = {PERTURBED: x, DERIVED: x, MOMENTUM: self.momentum}
        const = getattr(sb.plain, "weights", None) is not None and not self.rescale
        rows = 8 if sb.write is not None else 4
        placeholders = [x, x if sb.slots[1] is not None else None, *(slot.get(s) for s in sb.slots[2:])]
        a = coefficients(sb, placeholders, self.rescale) if const else self.a_buf[rows]
        return StepArgs(m=x, m_c=placeholders[1], m_2=placeholders[2], m_3=placeholders[3], a=a, m_w=m_w, **common)

    # -- the loop --------------------------------------------------------------------------------

    def run(self, model: Callable, perturbed_model: Callable | None, x: torch.Tensor, *, seeds, generator,
            cond: Cond, uncond: Cond, progress: bool, classifier: Callable | None,
            classifier_y: torch.Tensor | None) -> torch.Tensor:
        """Every row from the state ``x``: the model call(s), the blend's coefficients where they need
        data, one step. Returns a new tensor."""
        plan, b, dev, dt = self.plan, self.b, self.dev, self.dt
        self._reset(x, seeds)
        n = len(plan.rows)
        conds = {UNCOND: uncond, COND: cond}
        call_cond: dict[tuple[str, ...], Cond] = {}
        for s in set(self.shared):
            c = conds[s[0]]
            for name in s[1:]:
                c = cat_cond(c, conds[name]) if c is not None else None
            call_cond[s] = c
        ts = self.ts
        if n:
            self._write_input(0)
        it = range(n)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="fastdiff", total=n)
        for i in it:
            r, sb, shared = plan.rows[i], self.blends[i], self.shared[i]
            k = len(shared)
            inp, single = self.inputs[i], self.single
            refs = sys.getrefcount(inp), sys.getrefcount(single)
            y = self._output(call_model(model, inp, ts[r.t, k], call_cond[shared]), (k * b, *self.x.shape[1:]), r)
            p = None  # the third slot: the perturbed branch, or one derived from the branches
            if sb is not None and sb.slots[2] == PERTURBED:
                p = self._output(call_model(perturbed_model, single, ts[r.t, 1], cond), tuple(self.x.shape), r)
                self.program.set(i, "m_2", p)
            elif sb is not None and sb.slots[2] == DERIVED:
                branches = {name: y[j * b:(j + 1) * b] for j, name in enumerate(shared)}
                branches[MOMENTUM] = self.momentum
                p = sb.derive(branches)
                p = p.to(dtype=dt).contiguous()
                self.program.set(i, "m_2", p)
            if (sys.getrefcount(inp), sys.getrefcount(single)) != refs or self._users() != self.base:
                # a model kept its input (or returned a view of it): the step must not overwrite it
                self._renew_input()
            if self.z_buf is not None and r.noise:
                self.program.set(i, "z", draw_noise(self.x.shape, generator, torch.float32, dev).to(dt)
                                 .contiguous())
            if self.g_buf is not None and self.cg[i] != 0.0:
                from ..runtime.row_terms import classifier_grad

                u = self.x * r.in_scale
                self.program.set(i, "g", classifier_grad(classifier, u, torch.full((b,), r.t, dtype=self.t_dt,
                                                                                   device=dev),
                                                         classifier_y).to(dt).contiguous())
            a = self.rows[i].a
            data = sb is not None and (a is self.a_buf[4] or a is self.a_buf[8])  # coefficients from the data
            if data or self.rows[i].clip == 2:
                slots = [y[:b], y[b:2 * b] if sb is not None and sb.slots[1] is not None else None, p,
                         self.momentum if sb is not None and sb.slots[3] == MOMENTUM else None]
                if data:
                    a.copy_(coefficients(sb, slots, self.rescale, extension=self.extension))
                if self.rows[i].clip == 2:
                    self.s_buf.copy_(_clip_bound(plan, self.x, slots, a if sb is not None else None, self.coefs[i],
                                                 self.rows[i].g))
            if self.run_ptr is not None:
                self.run_ptr(i, y.data_ptr())
            else:
                self.program.run(i, y)
        self._finish()
        return self.x

    def _reset(self, x: torch.Tensor, seeds) -> None:
        """Start a call: a new state tensor holding ``x`` (what the call returns; the rows pointed at
        it), the history, momentum buffer and flags zeroed, the seeds loaded."""
        if self.runs:
            old = self.x.untyped_storage().data_ptr()
            with torch.inference_mode(False):
                self.x = torch.empty_like(self.x)
            self.written.discard(old)
            self.written.add(self.x.untyped_storage().data_ptr())
            for name in ("x", "out"):
                self.program.set(-1, name, self.x)
            for t in (*self.hist, self.momentum, self.flags):
                if t is not None:
                    t.zero_()
        self.runs += 1
        self.x.copy_(x)
        if self.seeds is not None:
            self.seeds.copy_(torch.as_tensor(list(seeds), dtype=torch.int64))

    def _write_input(self, i: int) -> None:
        """Row ``i``'s model input from the state, as the step before it would write it."""
        b = self.b
        torch.mul(self.x, self.plan.rows[i].in_scale, out=self.inp[:b])
        for j in range(1, len(self.shared[i])):
            self.inp[j * b:(j + 1) * b].copy_(self.inp[:b])

    def _output(self, y, want: tuple, r) -> torch.Tensor:
        """A model output as the step reads it: a dense tensor of ``want`` shape, the state's dtype and
        device, contiguous, detached, and not a view of a buffer the step writes."""
        from ..models.denoisers import unwrap_output

        y = unwrap_output(y)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"model must return a tensor, got {type(y).__name__}")
        if tuple(y.shape) != tuple(want):
            raise ValueError(f"model output at step {r.step} has shape {tuple(y.shape)}, expected {tuple(want)}")
        if y.layout != torch.strided or y.device.type == "meta":
            what = "has no memory" if y.device.type == "meta" else f"is a {y.layout} tensor"
            raise ValueError(f"model output at step {r.step} is on {y.device} and {what}; expected a dense "
                             f"tensor on {self.dev}")
        y = y.detach().to(dtype=self.dt, device=self.dev).contiguous()
        if y.numel():
            at = y.untyped_storage().data_ptr()
            if at in self.written or at == self.storage.data_ptr():
                y = y.clone()  # (a view of) a buffer the step writes, the model input included
        return y

    def _finish(self) -> None:
        if self.flags is not None:
            raise_flagged(self.flags, self.plan.rows)


def _shared(sb: StepBlend | None) -> tuple[str, ...]:
    """The branches a row evaluates in its one batched model call, in the call's order."""
    if sb is None:
        return (COND,)
    return tuple(s for s in sb.slots[:2] if s is not None)


def canonical_blend(sb: StepBlend, i: int = 0) -> StepBlend:
    """``sb`` with its slots laid out as the prepared program takes them: the batched call's branches
    (unconditional, then conditional) in ``m``/``m_c``, the perturbed branch (or a derived slot) in
    ``m_2``, the momentum buffer in ``m_3``. The same blend: ``plain`` (and the momentum write) permuted to the new slots,
    the statistics it reads permuted back; itself where the layout is that already."""
    present = set(sb.slots) - {None}
    if MODALITY in present:
        raise ValueError("LTX-2's modality branch is not evaluated by fastdiff.sample; blend it with "
                         "fastdiff.guiders.guide")
    shared = [s for s in (UNCOND, COND) if s in present]
    if not shared:
        raise ValueError(f"row {i}: the guider's blend {sb.slots} has neither the conditional nor the "
                         "unconditional branch")
    if PERTURBED in present and DERIVED in present:
        raise ValueError(f"row {i}: the guider's blend {sb.slots} has both a perturbed and a derived slot")
    third = PERTURBED if PERTURBED in present else DERIVED if DERIVED in present else None
    new = (shared[0], shared[1] if len(shared) > 1 else None, third, MOMENTUM if MOMENTUM in present else None)
    if new == tuple(sb.slots):
        return sb
    perm = [[0.0] * 4 for _ in range(4)]  # perm[new][old] = 1 where the branch moved
    for k, s in enumerate(new):
        if s is not None:
            perm[k][list(sb.slots).index(s)] = 1.0

    def moved(weights):
        return tuple(float(sum(perm[k][j] * weights[j] for j in range(4))) for k in range(4))

    base = sb.plain
    if getattr(base, "weights", None) is not None:
        plain = constant(*moved(base.weights))
    else:
        def plain(stats, b, device):
            if stats is None:
                return base(None, b, device) @ device_constant(perm, device).T
            p = stats.ops.array(perm, stats.gram)
            old = Stats(p.T @ stats.gram @ p, stats.sums @ p, stats.n)
            return base(old, b, device) @ p.T
    return StepBlend(new, plain, needs_stats=sb.needs_stats, write=None if sb.write is None else moved(sb.write),
                     derive=sb.derive)


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
    return StepBlend(sb.slots, plain, needs_stats=sb.needs_stats, write=keep, derive=sb.derive)


def _clip_bound(plan: Plan, x: torch.Tensor, slots, a, coef, grad=None) -> torch.Tensor:
    """The dynamic-threshold clip bound ``s`` of a clipping row, computed from the row's data
    estimate with the blended prediction (the reference backend's blend)."""
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
