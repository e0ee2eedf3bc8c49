"""The prepared sampling loop: everything that does not depend on the noise, done once.

An :class:`Executor` is built for one plan, state shape, dtype, device, guidance setting and
backend. It packs every row's coefficients (with the next row's ``in_scale``, so each step writes
the next model input), allocates the persistent buffers (state and history ring in one arena, the
model input in an allocation of its own; per-row guidance scales; clip bounds; seeds; the per-row
non-finite flags), validates every row once and resolves the backend once, into a *program*
(:func:`fastdiff.runtime.ops.prepare`).
Calling :meth:`Executor.run` then does, per row, one model call and one extension call:

    out = model(u, t_i[, cond])          # u: the [B] or [2B] model input the previous step wrote
    program.run(i, out)                  # guidance blend, solver update, noise, mask, next u, flag

and nothing else in the common case (no ``torch.cat``, no scaling pass, no finite-check pass).
Rows that need host work (a callback, ``post_step``, noise drawn on the host, classifier
guidance, a timer) take the general path, which runs the same program with that row's extra
operands pointed at for it alone, and rewrites the model input from the state after a
``post_step`` that may have changed it.

Reuse: the returned tensor is always new (the last row writes it); concurrent calls from several
threads each take their own workspace (buffers and program) from a small pool.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import ops
from ..core import validate
from ..core.args import StepArgs, clip_code, pack_row
from ..core.guidance import Guidance, cfgpp_scale, rescale_factor, threshold_bound
from ..core.plan import Plan, score_coeffs

ModelFn = Callable[..., torch.Tensor]
Cond = torch.Tensor | dict | None

MAX_IDLE_WORKSPACES = 2
"""Workspaces an executor keeps between calls (more are made for concurrent calls, then dropped)."""

def _normal_tensors(fn):
    """Run ``fn`` outside inference mode: buffers made for later calls must be normal tensors (an
    inference tensor cannot be updated outside ``torch.inference_mode``), whichever mode the first
    call came in."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""How many tensors share a storage (torch's own count): tells whether a model kept its input."""


class NonFiniteError(FloatingPointError):
    """The model returned NaN or Inf."""


class StopSampling(Exception):
    """Raised by a ``post_step`` or ``callback`` hook to end the loop after the row it ran for (the
    state after that row is returned, not scaled by ``plan.out_scale``), as a pipeline whose
    callback sets ``_interrupt`` returns the latents it has; raised by the model, the state before
    that row's step is returned."""


class _Stopped(Exception):
    """The loop stopped after ``done`` rows (internal)."""

    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done


def raise_flagged(flags: torch.Tensor, rows) -> None:
    """Raise :class:`NonFiniteError` naming the first row whose kernel flagged a non-finite model output
    (``flags``: one int32 per row). On a GPU this is the loop's one host sync, after the loop."""
    from ..backends import cpu

    if flags.device.type == "cpu" and cpu._C is not None:
        i = cpu._C.first_flag(flags.data_ptr(), flags.numel())
    else:
        nz = flags.nonzero()
        i = int(nz[0, 0]) if nz.numel() else -1
    if i >= 0:
        r = rows[i]
        raise NonFiniteError(f"model output has NaN or Inf at step {r.step} (row {i}, sigma {r.sigma:.6g})")


def draw_noise(shape, generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Draw standard normals exactly as diffusers' ``randn_tensor`` does for this generator.

    A list of generators draws one sample each; a CPU generator for a CUDA tensor draws on the CPU.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator list has {len(generator)} entries but the batch has {shape[0]}")
        parts = [draw_noise((1, *shape[1:]), g, dtype, device) for g in generator]
        return torch.cat(parts, dim=0)
    gdev = generator.device if generator is not None else device
    z = torch.randn(shape, generator=generator, device=gdev, dtype=dtype)
    return z.to(device)


def cat_cond(a: Cond, b: Cond) -> Cond:
    """``[a; b]`` along the batch, key by key for dicts (non-tensor entries taken from ``a``)."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) if isinstance(a[k], (torch.Tensor, dict)) else a[k] for k in a}
    return torch.cat([a, b], dim=0)


def call_model(model: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """``model(x, t)``, ``model(x, t, cond)`` or ``model(x, t, **cond)``."""
    if cond is None:
        return model(x, t)
    if isinstance(cond, dict):
        return model(x, t, **cond)
    return model(x, t, cond)


@dataclass
class Call:
    """What one :meth:`Executor.run` call brings besides the model and the initial state."""

    cond: Cond = None
    uncond: Cond = None
    seeds: Sequence[int] | torch.Tensor | None = None
    generator: torch.Generator | list | None = None
    noise_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    mask: torch.Tensor | None = None
    known: torch.Tensor | None = None
    callback: Callable | None = None
    progress: bool = False
    timer: object | None = None
    classifier: Callable | None = None
    classifier_y: torch.Tensor | None = None
    post_step: Callable[[int, torch.Tensor], None] | None = None
    """``post_step(i, x)`` runs after row ``i``'s fused step (before ``callback``) and may change
    the state ``x`` IN PLACE (it must not replace it): a hook for projections that are not
    element-wise (ILVR super-resolution). It runs on the host every row, so it is not captured in
    a graph; multistep history is unaffected (rows read ``x`` and the history ring, not a copy)."""


class _Workspace:
    """One set of persistent buffers and the program that points at them."""

    @_normal_tensors
    def __init__(self, ex: "Executor") -> None:
        B, N = ex.shape[0], ex.numel
        dev, dt = ex.device, ex.dtype
        # state and history ring in one allocation: a model output inside it (a view of a buffer the
        # step writes) is found with one range test; the model input u is an allocation of its own,
        # so that it can be given up to a model that keeps it (see renew_input)
        self.arena = torch.empty((1 + ex.plan.n_slots) * N, dtype=dt, device=dev)
        views = self.arena.view(1 + ex.plan.n_slots, *ex.shape)
        self.x = views[0]
        self.hist = [views[1 + k] for k in range(ex.plan.n_slots)]
        start = self.arena.data_ptr()
        self.span = (start, start + self.arena.numel() * self.arena.element_size())
        self.flags = torch.zeros(len(ex.rows), dtype=torch.int32, device=dev) if ex.check_finite else None
        self.r = torch.ones(B, dtype=torch.float32, device=dev)
        self.s = torch.ones(B, dtype=torch.float32, device=dev)
        self.seeds = torch.zeros(B, dtype=torch.int64, device=dev)
        self._new_input(ex)
        self.rows = [self._args(ex, i) for i in range(len(ex.rows))]
        self.program = ops.prepare(self.rows, ex.backend, ex.reductions)
        self.run_ptr = getattr(self.program, "run_ptr", None)  # the extension's own run(i, address)
        self.done = None  # CUDA: (stream, event) after the last call's work
        self.base = self.input_users()
        self.refs = sys.getrefcount(self.inputs[0])  # the list's own reference, and getrefcount's

    def _new_input(self, ex: "Executor") -> None:
        B = ex.shape[0]
        n_u = 2 if any(ex.guided) else 1
        self.u = torch.empty((n_u * B, *ex.shape[1:]), dtype=ex.dtype, device=ex.device)
        start = self.u.data_ptr()
        self.uspan = (start, start + self.u.numel() * self.u.element_size())
        self.u_storage = self.u.untyped_storage()
        self.inputs = [self.u[: (2 if g else 1) * B] for g in ex.guided[:len(ex.rows)]]  # each row's model input

    def input_users(self) -> int:
        """How many tensors use the model input's memory (0 where torch cannot say)."""
        return _use_count(self.u_storage._cdata) if _use_count is not None else 0

    @_normal_tensors
    def renew_input(self, ex: "Executor") -> None:
        """Give the model input buffer up (the model kept it, or a view of it: what it keeps must stay
        what it was given, as with diffusers and k-diffusion, which pass a new tensor every step)
        and point the rows at a new one, which the next step fills."""
        self._new_input(ex)  # nothing to copy: the next step writes the whole next input
        for i, a in enumerate(self.rows):
            if a.u is not None:
                self.program.set(i, "u", self.u[: a.u.shape[0]])
        self.base = self.input_users()

    def _args(self, ex: "Executor", i: int) -> StepArgs:
        r = ex.rows[i]
        B = ex.shape[0]
        guided = ex.guided[i]
        nxt = i + 1 < len(ex.rows)
        clip = clip_code(r)
        return StepArgs(
            x=self.x, out=self.x, m=self.x, m_c=self.x if guided else None, coef=ex.packed[i], row=i,
            h_read=tuple(self.hist[k] for k in r.reads), h_write=tuple(self.hist[w.slot] for w in r.writes),
            w=ex.W[i] if guided else None, r=self.r if guided and ex.guidance.rescale > 0 else None,
            s=ex.s_static if clip == 1 else self.s if clip == 2 else None, clip=clip, seeds=self.seeds,
            mask=self.x if ex.masked else None, known=self.x if ex.masked else None,
            # the view row i writes: a tensor object of its own, not inputs[i + 1], whose reference
            # count Executor._taken reads (renew_input re-points it)
            u=self.u[: (2 if ex.guided[i + 1] else 1) * B] if nxt else None,
            flag=self.flags[i:i + 1] if self.flags is not None else None,
        )

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` starts inside a buffer the step writes (state, history ring, model input)."""
        p = t.data_ptr()
        return self.span[0] <= p < self.span[1] or self.uspan[0] <= p < self.uspan[1]

    def write_input(self, ex: "Executor", i: int, x: torch.Tensor) -> None:
        """Write row ``i``'s model input from the state ``x``, as the step would (``x * in_scale``)."""
        B = ex.shape[0]
        torch.mul(x, ex.rows[i].in_scale, out=self.u[:B])
        if ex.guided[i]:
            self.u[B:2 * B].copy_(self.u[:B])


class Executor:
    """A prepared sampling loop for one plan (see the module docstring).

    Args:
        plan: the rows to run.
        shape, dtype, device: of the state ``[B, ...]``; a call with another raises, naming it.
        guidance: classifier-free guidance settings (scales per row are fixed here).
        backend: ``auto`` or a backend name (``FASTDIFF_BACKEND`` is read here, once).
        check_finite: record non-finite model outputs in the kernel and raise
            :class:`NonFiniteError` naming the first step after the loop.
        classifier_scale: the classifier-guidance scale, or ``None`` for no classifier guidance.
        masked: the calls bring ``mask`` and ``known`` (inpainting rows).
    """

    @_normal_tensors
    def __init__(self, plan: Plan, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str, *,
                 guidance: Guidance | None = None, backend: str = "auto", check_finite: bool = True,
                 classifier_scale: float | None = None, masked: bool = False) -> None:
        self.plan = plan
        self.rows = plan.rows
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not dtype.is_floating_point or len(self.shape) < 1 or self.shape[0] < 1:
            raise ValueError(f"the state must be a floating [B, ...] tensor with B >= 1, got {dtype} {self.shape}")
        self.numel = 1
        for s in self.shape:
            self.numel *= s
        B, dev = self.shape[0], self.device
        self.guidance = guidance or Guidance()
        self.backend = ops.requested_backend(backend)
        self.check_finite = bool(check_finite)
        self.masked = bool(masked)
        self.classifier_scale = classifier_scale
        wscale = self.guidance.scales(plan)
        self.guided = [w != 1.0 for w in wscale] + [False]  # one past the end: no next row
        if self.guidance.rescale > 0 and any(self.guided) and self.numel // B < 2:
            raise ValueError(f"guidance_rescale needs at least 2 elements per sample (it is a ratio of per-sample "
                             f"standard deviations); the state has shape {self.shape}")
        if classifier_scale is not None:
            from .row_terms import classifier_coefficients

            self.cg = classifier_coefficients(plan, classifier_scale)
        else:
            self.cg = [0.0] * len(self.rows)
        n = len(self.rows)
        self.packed = [pack_row(r, self.cg[i], fold=True, u_scale=self.rows[i + 1].in_scale if i + 1 < n else 1.0)
                       for i, r in enumerate(self.rows)]
        # the model's time in float32 (what diffusers and k-diffusion pass), float64 for a float64 state
        t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.t_src = torch.tensor([r.t for r in self.rows], dtype=torch.float64).to(t_dtype).to(dev)
        self.t_table = self.t_src.clone()  # what the model gets views of: restored every call
        self.t_in = [self.t_table[i].expand((2 if self.guided[i] else 1) * B) for i in range(n)]
        # CFG++ rows run as guided rows with their scale folded (cfgpp_scale); the data estimate a
        # callback sees keeps the plain scale (W_est)
        self.W_est = torch.tensor(wscale, dtype=torch.float32).to(dev)[:, None].expand(n, B).contiguous()
        if any(r.write_u_slot is not None for r in self.rows):
            raise ValueError(f"{plan.sampler} keeps the unconditional estimate as history: it runs on the guided loop "
                             "(fastdiff.sample picks it), not on a prepared executor")
        if any(r.out_u for r in self.rows):
            if self.guidance.rescale > 0:
                raise ValueError("guidance_rescale does not combine with a CFG++ sampler (its rows fold the "
                                 "unconditional estimate into the guidance scale)")
            wscale = [cfgpp_scale(r, self.packed[i], w) for i, (r, w) in enumerate(zip(self.rows, wscale))]
        self.W = torch.tensor(wscale, dtype=torch.float32).to(dev)[:, None].expand(n, B).contiguous()
        self.s_static = torch.full((B,), float(plan.clip_range), dtype=torch.float32, device=dev)
        self.reductions = [self._reduction(i) for i in range(n)]
        self.noise_dtype = getattr(torch, plan.noise_dtype) if plan.noise_dtype else dtype
        self._idle: list[_Workspace] = []
        self._lock = threading.Lock()
        self._graph_lock = threading.Lock()
        self._graph: _GraphState | None = None
        self._idle.append(_Workspace(self))  # build (and validate) one now: errors surface here

    def _reduction(self, i: int) -> ops.Reduction | None:
        r = self.rows[i]
        phi = self.guidance.rescale if self.guided[i] else 0.0
        dyn = clip_code(r) == 2 and not r.snr
        if not phi and not dyn and not r.snr:
            return None
        p = self.plan
        l_x = l_e = 0.0
        if r.snr:
            l_x, l_e = score_coeffs(r.a_x, r.a_e, r.alpha_t, r.sigma_t, r.in_scale)
        return ops.Reduction(rescale=phi, threshold_ratio=p.threshold_ratio if dyn else 0.0,
                             threshold_max=p.threshold_max, snr=r.snr, l_x=l_x, l_e=l_e,
                             batch_norm=p.snr_norm == "batch")

    # -- calls -------------------------------------------------------------------------------

    def _workspace(self) -> _Workspace:
        with self._lock:
            ws = self._idle.pop() if self._idle else None
        if ws is None:
            return _Workspace(self)
        if ws.done is not None:  # CUDA: the last call's work on another stream must finish first
            stream = torch.cuda.current_stream(self.device)
            if stream != ws.done[0]:
                stream.wait_event(ws.done[1])
        return ws

    def _release(self, ws: _Workspace) -> None:
        if self.device.type == "cuda":  # the work this call queued still uses the buffers
            stream = torch.cuda.current_stream(self.device)
            ev = torch.cuda.Event()
            ev.record(stream)
            ws.done = (stream, ev)
        with self._lock:
            if len(self._idle) < MAX_IDLE_WORKSPACES:
                self._idle.append(ws)

    def check_state(self, x: torch.Tensor, name: str = "noise") -> None:
        """Raise, naming what differs, unless ``x`` has this executor's shape, dtype and device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != self.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but this sampler was prepared for {self.shape}")
        if x.dtype != self.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but this sampler was prepared for {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but this sampler was prepared for {self.device}")

    def run(self, model: ModelFn, x: torch.Tensor, call: Call | None = None) -> torch.Tensor:
        """Run every row from the initial state ``x`` (already scaled by ``plan.init_scale``; not
        modified) and return the final sample, scaled by ``plan.out_scale``, in a new contiguous tensor."""
        call = call or Call()
        self.check_state(x, "the initial state")
        B = self.shape[0]
        on = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        with torch.no_grad(), on:  # launches go to the executor's device whichever is current
            cond_cat, seeds = self._check_call(call)
            ws = self._workspace()
            try:
                return _in_layout_of(x, self._run(ws, model, x, call, cond_cat, seeds, B))
            finally:
                self._release(ws)

    def _check_call(self, call: Call):
        B = self.shape[0]
        dev = self.device
        any_guided = any(self.guided)
        validate.guided_needs_cond(any_guided, call.cond, call.uncond)
        validate.conditioning("cond", call.cond, B)
        validate.conditioning("uncond", call.uncond, B)
        validate.check_generator(call.generator, B)
        for name in ("callback", "post_step", "classifier", "noise_fn"):
            validate.hook(name, getattr(call, name))
        if call.cond is not None and call.uncond is not None and any_guided:
            if type(call.cond) is not type(call.uncond):
                raise TypeError("cond and uncond must both be tensors or both be dicts")
            if isinstance(call.cond, dict) and set(call.cond) != set(call.uncond):
                raise ValueError(f"cond keys {sorted(call.cond)} differ from uncond keys {sorted(call.uncond)}")
        cond_cat = None
        if any_guided:
            cond_cat = cat_cond(call.uncond, call.cond) if call.cond is not None else call.uncond
        if (call.mask is not None) != self.masked:
            raise ValueError("this sampler was prepared " + ("for" if self.masked else "without") +
                             " inpainting (mask and known); the call " + ("lacks" if self.masked else "gives") + " them")
        if call.mask is not None and call.known is None:
            raise ValueError("mask needs known (the known image)")
        if (call.classifier is not None) != (self.classifier_scale is not None):
            raise ValueError("this sampler was prepared " + ("with" if self.classifier_scale is not None else "without")
                             + " classifier guidance; give classifier= exactly then")
        if call.classifier is not None:
            y = call.classifier_y
            if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"classifier guidance needs classifier_y, an integer tensor of shape ({B},), got "
                                 f"{type(y).__name__ if not isinstance(y, torch.Tensor) else (y.dtype, tuple(y.shape))}")
        external = call.noise_fn is not None or call.generator is not None
        renoise = self.masked and any(r.known_s != 0 for r in self.rows)
        seeds = None
        if (not external and any(r.noise for r in self.rows)) or (renoise and call.generator is None):
            if call.seeds is None:
                raise ValueError(f"sampler {self.plan.sampler!r} draws noise: give seed= or generator=")
            seeds = torch.as_tensor(call.seeds, dtype=torch.int64)
            if seeds.shape != (B,):
                raise ValueError(f"seeds must have one entry per sample ({B}), got shape {tuple(seeds.shape)}")
            seeds = seeds.to(dev)
        return cond_cat, seeds

    def _run(self, ws: _Workspace, model, x, call: Call, cond_cat, seeds, B) -> torch.Tensor:
        n = len(self.rows)
        result = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if n == 0:
            result.copy_(x)
            return result.mul_(self.plan.out_scale) if self.plan.out_scale != 1.0 else result
        mask_t, known_t = self._bind(ws, result, seeds, call)
        if ws.flags is not None:
            ws.flags.zero_()
        self.t_table.copy_(self.t_src)  # a model may write into its time tensor
        ws.x.copy_(x)
        ws.write_input(self, 0, ws.x)
        conds = [cond_cat if g else call.cond for g in self.guided[:n]]
        it = range(n)
        if call.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"fastdiff {self.plan.sampler}", total=n)
        try:
            self._rows(ws, model, conds, call, mask_t, known_t, result, it)
        except _Stopped as stop:  # the state after the rows done (the last row writes the result itself)
            if stop.done < n:
                result.copy_(ws.x)
            self._finish(ws)
            return result
        self._finish(ws)
        if self.plan.out_scale != 1.0:
            result.mul_(self.plan.out_scale)
        return result

    def _bind(self, ws: _Workspace, result: torch.Tensor, seeds, call: Call):
        """Point the program at this call's result, seeds, mask and known."""
        ws.program.set(len(self.rows) - 1, "out", result)
        if seeds is not None:
            ws.seeds.copy_(seeds)
        mask_t = known_t = None
        if self.masked:
            mask_t = call.mask.to(dtype=self.dtype, device=self.device).contiguous()
            known_t = call.known.to(dtype=self.dtype, device=self.device).contiguous()
            ws.program.set(-1, "mask", mask_t)
            ws.program.set(-1, "known", known_t)
        return mask_t, known_t

    def _rows(self, ws: _Workspace, model, conds, call: Call, mask_t, known_t, result, it,
              graphed: bool = False) -> None:
        """Every row: the fast path (one model call, one program run) unless the row has host work.
        Raises :class:`_Stopped` with the number of rows done when a hook or the model stops the loop."""
        n, B = len(self.rows), self.shape[0]
        y = call.classifier_y.to(device=self.device, dtype=torch.int64) if call.classifier is not None else None
        hooks = (call.callback is not None or call.post_step is not None or call.timer is not None
                 or call.noise_fn is not None or call.generator is not None)
        host = [hooks or (call.classifier is not None and self.cg[i] != 0.0) for i in range(n)]
        run_ptr, run = ws.run_ptr, ws.program.run
        dt = self.dtype
        shapes = [(2 * B if self.guided[i] else B, *self.shape[1:]) for i in range(n)]
        dev = self.device
        t_in = self.t_in
        watch = _use_count is not None and not graphed  # a graph's buffers are static by design
        taken = self._taken
        for i in it:
            if host[i]:
                try:
                    self._general_row(ws, i, model, call, conds[i], y, mask_t, known_t, result, watch)
                except StopSampling as stop:
                    raise _Stopped(i + 1 if stop.args == ("after",) else i) from stop
                continue
            try:
                out = call_model(model, ws.inputs[i], t_in[i], conds[i])
            except StopSampling as stop:  # raised by the model itself: the state before this row
                raise _Stopped(i) from stop
            # the whole device, not its index: get_device() is -1 for cpu and meta alike and 0 for cuda:0,
            # xpu:0 and mps:0, so another device's memory would reach the kernel as a raw pointer
            if (type(out) is not torch.Tensor or out.dtype != dt or out.shape != shapes[i] or not out.is_contiguous()
                    or out.device != dev):
                out = self._normalise(out, i)
            out, p = taken(ws, out, i, watch)
            if run_ptr is not None:
                run_ptr(i, p)
            else:
                run(i, out)

    # -- CUDA graphs ---------------------------------------------------------------------------

    def run_graphed(self, model: ModelFn, x: torch.Tensor, call: Call | None = None, cuda=None) -> torch.Tensor:
        """:meth:`run` as the replay of one CUDA graph of the whole loop, captured on the first call
        and again only when the model or the conditioning's structure changed (see
        :mod:`fastdiff.runtime.graphs`). Returns a new tensor (a copy of the graph's static result).
        Concurrent calls take turns. ``cuda`` replaces ``torch.cuda`` (tests of the control flow)."""
        from . import graphs

        call = call or Call()
        self.check_state(x, "the initial state")
        if cuda is None:  # (a stand-in for torch.cuda runs on CPU tensors)
            graphs.check_graphable(self.device, generator=call.generator, noise_fn=call.noise_fn,
                                   callback=call.callback, post_step=call.post_step, timer=call.timer,
                                   classifier=call.classifier, progress=call.progress, cond=call.cond,
                                   uncond=call.uncond, mask=call.mask, known=call.known)
        with torch.no_grad():
            cond_cat, seeds = self._check_call(call)
            with self._graph_lock:
                g = self._graph
                key = (graphs.model_key(model), graphs.structure(call.cond), graphs.structure(call.uncond))
                if g is None or g.key != key:
                    self._graph = None  # the old graph (and its pool) go before the new capture
                    g = self._graph = _GraphState(self, model, call, cond_cat, key)
                    g.load(x, seeds, call, cond_cat)
                    g.graph = graphs.capture(g.body, self.device, cuda)
                else:
                    g.load(x, seeds, call, cond_cat)
                g.graph.replay()
                self._finish(g.ws)
                return _in_layout_of(x, g.result.clone())

    def _normalise(self, out, i: int) -> torch.Tensor:
        """A model output as the step takes it: a tensor of the row's shape (never broadcast), the
        state's dtype and device, contiguous, detached."""
        r = self.rows[i]
        want = (2 * self.shape[0] if self.guided[i] else self.shape[0], *self.shape[1:])
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model must return a tensor (wrap diffusers/k-diffusion models with fastdiff.models.denoisers), "
                            f"got {type(out).__name__}")
        if tuple(out.shape) != want:
            raise ValueError(f"model output at step {r.step} has shape {tuple(out.shape)}, expected {want}")
        if out.layout != torch.strided or out.device.type == "meta":  # no memory the step could read
            what = "has no memory" if out.device.type == "meta" else f"is a {out.layout} tensor"
            raise ValueError(f"model output at step {r.step} is on {out.device} and {what}; expected a dense "
                             f"tensor on {self.device}")
        # any layout, dtype or device the model returns (detached: a model may enable grad inside)
        return out.detach().to(dtype=self.dtype, device=self.device).contiguous()

    def _taken(self, ws: _Workspace, out: torch.Tensor, i: int, watch: bool) -> tuple[torch.Tensor, int]:
        """Row ``i``'s (normalised) model output as the step may read it, and its address; the model
        input made safe from the step. An output inside a buffer the step writes is copied, one
        without memory refused; where the model kept its input (the tensor it was given: one more
        reference to it; or a view of its memory: one more tensor on it), the workspace gets a new
        input buffer, so the step cannot overwrite what the model keeps. On every row's hot path:
        written out, no further calls."""
        p = out.data_ptr()
        if ws.span[0] <= p < ws.span[1] or ws.uspan[0] <= p < ws.uspan[1]:  # (a view of) a buffer the step writes
            out = out.clone()
            p = out.data_ptr()
        elif not p and out.numel():
            raise ValueError(f"model output at step {self.rows[i].step} has no memory (a {out.device} tensor); "
                             f"expected a tensor on {self.device}")
        if watch and (sys.getrefcount(ws.inputs[i]) != ws.refs or _use_count(ws.u_storage._cdata) != ws.base):
            ws.renew_input(self)
        return out, p

    def _finish(self, ws: _Workspace) -> None:
        if ws.flags is not None:
            raise_flagged(ws.flags, self.rows)

    # -- the general path: rows with host work -------------------------------------------------

    def _general_row(self, ws: _Workspace, i: int, model, call: Call, cond, y, mask_t, known_t, result,
                     watch: bool) -> None:
        """Row ``i`` with host work around it: the same program run, with the operands drawn or
        computed on the host (external noise, the classifier gradient) pointed at for this row only."""
        from .row_terms import classifier_grad, x0_estimate

        r = self.rows[i]
        B = self.shape[0]
        n = len(self.rows)
        x = ws.x
        target = result if i == n - 1 else x
        tm = call.timer
        region = tm.region if tm is not None else _no_region
        if tm is not None:
            tm.start_row(i)
        with region("model"):
            out = call_model(model, ws.inputs[i], self.t_in[i], cond)
            out, _ = self._taken(ws, self._normalise(out, i), i, watch)
            m, m_c = (out[:B], out[B:]) if self.guided[i] else (out, None)
        a = ws.rows[i]
        w = a.w
        rr = s = None
        clip = a.clip
        grad = None
        with region("guidance"):
            if call.classifier is not None and self.cg[i] != 0.0:
                x_in = x * r.in_scale  # from the state: the model may have written into its input
                grad = classifier_grad(call.classifier, x_in, self.t_in[i][:B], y).to(self.dtype).contiguous()
            if call.callback is not None:  # (the program computes its own r and s for its step)
                ext = self.backend != "reference"  # the reference backend: plain torch throughout
                if m_c is not None and self.guidance.rescale > 0:
                    rr = rescale_factor(m, m_c, w, self.guidance.rescale, extension=ext)
                if clip == 1:
                    s = self.s_static
                elif clip == 2:
                    s = threshold_bound(x, m, m_c, w, rr, a.coef, self.plan.threshold_ratio,
                                        self.plan.threshold_max, g=grad, extension=ext)
        z = None
        if r.noise and (call.noise_fn is not None or call.generator is not None):
            with region("noise"):
                if call.noise_fn is not None:
                    z = call.noise_fn(i, x)
                else:
                    z = draw_noise(self.shape, call.generator, self.noise_dtype, self.device)
                z = _external_noise(z, x, i)
                if ws.holds(z):  # noise_fn handed back (a view of) a buffer the step writes
                    z = z.clone()
        z2 = None
        if mask_t is not None and r.known_s != 0 and call.generator is not None:
            with region("noise"):  # the known region's re-noising, drawn after the solver noise
                z2 = draw_noise(self.shape, call.generator, self.noise_dtype, self.device).to(dtype=self.dtype)
                z2 = z2.contiguous()
        w_est = self.W_est[i] if r.out_u and m_c is not None else w
        x0 = x0_estimate(x, m, m_c, w_est, rr, r, s, clip) if call.callback is not None else None
        extra = [(k, v) for k, v in (("z", z), ("z2", z2), ("g", grad)) if v is not None]
        prog = ws.program
        for k, v in extra:
            prog.set(i, k, v)
        try:
            with region("step"):  # a Langevin row's step sizes included (a per-sample reduction)
                prog.run(i, out)
        finally:
            for k, _ in extra:
                prog.set(i, k, None)
        try:
            if call.post_step is not None:
                call.post_step(i, target)
            if call.callback is not None:  # this step's own state, as diffusers' and k-diffusion's callbacks get
                call.callback(r.step, r.sigma, target.clone(), x0)
        except StopSampling as stop:
            raise StopSampling("after") from stop
        if call.post_step is not None and i + 1 < n:
            ws.write_input(self, i + 1, target)  # the hook may have changed the state


class _GraphState:
    """A captured loop: its own workspace, the static inputs it reads and the result it writes."""

    @_normal_tensors
    def __init__(self, ex: Executor, model, call: Call, cond_cat, key) -> None:
        from . import graphs

        self.key = key
        self.chain = graphs.model_chain(model)  # the graph reads the model's memory: keep it alive
        self.ws = ws = _Workspace(ex)
        self.x0 = torch.empty(ex.shape, dtype=ex.dtype, device=ex.device)
        self.result = torch.empty(ex.shape, dtype=ex.dtype, device=ex.device)
        self.cond_cat = graphs.static_copy(cond_cat)
        B = ex.shape[0]
        if call.cond is None:
            self.cond = None
        elif cond_cat is not None:  # the unguided rows' cond: the second half of [uncond; cond]
            self.cond = _halves(self.cond_cat, B)
        else:
            self.cond = graphs.static_copy(call.cond)
        self.mask = self.known = None
        if ex.masked:
            self.mask = torch.empty(ex.shape, dtype=ex.dtype, device=ex.device)
            self.known = torch.empty(ex.shape, dtype=ex.dtype, device=ex.device)
            ws.program.set(-1, "mask", self.mask)
            ws.program.set(-1, "known", self.known)
        ws.program.set(len(ex.rows) - 1, "out", self.result)
        n = len(ex.rows)
        conds = [self.cond_cat if g else self.cond for g in ex.guided[:n]]

        def body() -> None:
            if ws.flags is not None:
                ws.flags.zero_()
            ex.t_table.copy_(ex.t_src)
            ws.x.copy_(self.x0)
            ws.write_input(ex, 0, ws.x)
            ex._rows(ws, model, conds, Call(), self.mask, self.known, self.result, range(n), graphed=True)
            if ex.plan.out_scale != 1.0:
                self.result.mul_(ex.plan.out_scale)

        self.body = body
        self.graph = None

    def load(self, x, seeds, call: Call, cond_cat) -> None:
        """Copy one call's inputs into the static buffers the graph reads."""
        from . import graphs

        self.x0.copy_(x)
        if seeds is not None:
            self.ws.seeds.copy_(seeds)
        graphs.load(self.cond_cat, cond_cat)
        if cond_cat is None:
            graphs.load(self.cond, call.cond)
        if self.mask is not None:
            self.mask.copy_(call.mask)
            self.known.copy_(call.known)


def _in_layout_of(x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (contiguous) in ``x``'s memory layout where ``x`` is dense in another (channels_last,
    permuted), as torch's element-wise operations keep it."""
    if x.is_contiguous():
        return result
    out = torch.empty_like(x)  # preserve_format: x's strides when x is dense, else contiguous
    return result if out.is_contiguous() else out.copy_(result)


def _halves(c, b: int):
    """The second half (rows ``b:``) of every tensor of a ``[uncond; cond]`` conditioning."""
    if isinstance(c, dict):
        return {k: _halves(v, b) for k, v in c.items()}
    return c[b:] if isinstance(c, torch.Tensor) else c


def _no_region(name: str):
    return nullcontext()


def _external_noise(z, x: torch.Tensor, i: int) -> torch.Tensor:
    """``noise_fn``'s tensor for row ``i`` as the step takes it: ``x``'s shape (never broadcast), dtype, device, contiguous."""
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"noise_fn must return a tensor of the state's shape {tuple(x.shape)} at row {i}, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    return z.to(dtype=x.dtype, device=x.device).contiguous()


__all__ = ["Executor", "Call", "NonFiniteError", "StopSampling", "draw_noise"]
