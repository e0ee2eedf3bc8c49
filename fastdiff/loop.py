"""The sampling loop: model -> (guidance reductions) -> one fused step per plan row.

Everything the loop needs per row is prepared before the first model call: timesteps, guidance
scales and static clip bounds live in device tensors indexed by row, history buffers are
allocated once and the state is updated in place. So the loop performs no host-device
synchronisation on CUDA (non-finite model outputs are recorded on the device and reported, with
the step, after the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import ops
from .args import StepArgs, clip_code, compute_dtype, pack_row
from .guidance import Guidance, dynamic_threshold, rescale_factor
from .plan import Plan, Row, combo, score_coeffs
from .timing import RegionTimer

ModelFn = Callable[..., torch.Tensor]
Cond = torch.Tensor | dict | None


class NonFiniteError(FloatingPointError):
    """The model returned NaN or Inf."""


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


def _cat(a: Cond, b: Cond) -> Cond:
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) if isinstance(a[k], (torch.Tensor, dict)) else a[k] for k in a}
    return torch.cat([a, b], dim=0)


def _call(model: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    if cond is None:
        return model(x, t)
    if isinstance(cond, dict):
        return model(x, t, **cond)
    return model(x, t, cond)


def _batch_of(c: Cond) -> int | None:
    if c is None:
        return None
    if isinstance(c, dict):
        sizes = {v.shape[0] for v in c.values() if isinstance(v, torch.Tensor)}
        return sizes.pop() if len(sizes) == 1 else -1
    return c.shape[0]


@dataclass
class LoopOptions:
    """Options of :func:`run_plan` (see there)."""

    guidance: Guidance | None = None
    cond: Cond = None
    uncond: Cond = None
    seeds: Sequence[int] | torch.Tensor | None = None
    generator: torch.Generator | list | None = None
    noise_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    mask: torch.Tensor | None = None
    known: torch.Tensor | None = None
    backend: str = "auto"
    callback: Callable | None = None
    progress: bool = False
    check_finite: bool = True
    timer: RegionTimer | None = None
    cuda_graph: bool = False
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    classifier_scale: float = 1.0
    classifier_y: torch.Tensor | None = None
    post_step: Callable[[int, torch.Tensor], None] | None = None
    """``post_step(i, x)`` runs after row ``i``'s fused step (before ``callback``) and may change
    the state ``x`` IN PLACE (it must not replace it): a hook for projections that are not
    element-wise (ILVR super-resolution). It runs on the host every row, so it is not captured in
    a graph; multistep history is unaffected (rows read ``x`` and the history ring, not a copy)."""


def _no_region(name: str):
    return nullcontext()


def run_plan(plan: Plan, model: ModelFn, x: torch.Tensor, opts: LoopOptions) -> torch.Tensor:
    """Run every row of ``plan`` from the state ``x`` (already scaled by ``plan.init_scale``).

    ``x`` is updated in place and returned scaled by ``plan.out_scale``, in its own memory layout
    (strides); the loop itself works on a contiguous state (the layout every fused backend and the
    per-element Philox counter use), copied back into ``x`` at the end when ``x`` is not contiguous.
    Sampling is not differentiable: the loop runs under ``torch.no_grad()`` and returns a tensor
    that does not require grad (classifier guidance takes its own gradient).
    Noise comes from ``opts.noise_fn(row_index, x)`` if given, else ``opts.generator`` (drawn like
    diffusers), else in-kernel Philox keyed by ``opts.seeds``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"the state must be a floating [B, ...] tensor with B >= 1, got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
    with torch.no_grad():
        user_x = x.detach() if x.requires_grad else x  # same storage: still updated in place
        # Work on a contiguous state: the fused backends need it, and a non-contiguous one would
        # otherwise fall back to (or, with backend= named, be refused by) every kernel.
        work = user_x if user_x.is_contiguous() else user_x.contiguous()
        out = _run_plan(plan, model, work, opts)
        if out is user_x:
            return user_x
        if _writable_in_place(user_x):
            user_x.copy_(out)
            return user_x
        return out  # x overlaps itself (an expanded view): it cannot hold the result


def _writable_in_place(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` has its own memory location (no expanded or overlapping dims)."""
    extent = 0  # dims sorted by stride: each must step past everything the smaller ones reach
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= extent:
            return False
        extent += (size - 1) * stride
    return True


def _run_plan(plan: Plan, model: ModelFn, x: torch.Tensor, opts: LoopOptions) -> torch.Tensor:
    if opts.cuda_graph:
        _check_graphable(opts, x)
    B = x.shape[0]
    dev = x.device
    rows = plan.rows
    g = opts.guidance or Guidance()
    wscale = g.scales(plan)
    guided = [w != 1.0 for w in wscale]
    if any(guided) and opts.uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional conditioning)")
    if any(guided) and g.rescale > 0 and x[0].numel() < 2:
        raise ValueError(f"guidance_rescale needs at least 2 elements per sample (it is a ratio of per-sample "
                         f"standard deviations); the state has shape {tuple(x.shape)}")
    for name, c in (("cond", opts.cond), ("uncond", opts.uncond)):
        nb = _batch_of(c)
        if nb is not None and nb != B:
            raise ValueError(f"{name} has batch {nb} but noise has batch {B}; nothing is broadcast")
    if opts.cond is not None and opts.uncond is not None and any(guided):
        if type(opts.cond) is not type(opts.uncond):
            raise TypeError("cond and uncond must both be tensors or both be dicts")
        if isinstance(opts.cond, dict) and set(opts.cond) != set(opts.uncond):
            raise ValueError(f"cond keys {sorted(opts.cond)} differ from uncond keys {sorted(opts.uncond)}")
    cond_cat = _cat(opts.uncond, opts.cond) if any(guided) and opts.cond is not None else None

    # Per-row device tables, built once: no host->device copies inside the loop.
    # the model's time in float32 (what diffusers and k-diffusion pass), float64 for a float64 state
    t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ts = torch.tensor([r.t for r in rows], dtype=torch.float64).to(t_dtype).to(dev)
    W = torch.tensor(wscale, dtype=torch.float32).to(dev)
    W = W[:, None].expand(len(rows), B).contiguous()
    s_static = torch.full((B,), float(plan.clip_range), dtype=torch.float32, device=dev)
    hist = [torch.empty_like(x) for _ in range(plan.n_slots)]
    seeds = None
    renoise = opts.mask is not None and any(r.known_s != 0 for r in rows)
    external = opts.noise_fn is not None or opts.generator is not None
    if (not external and any(r.noise for r in rows)) or (renoise and opts.generator is None):
        if opts.seeds is None:
            raise ValueError(f"sampler {plan.sampler!r} draws noise: give seed= or generator=")
        seeds = torch.as_tensor(opts.seeds, dtype=torch.int64).to(dev)
        if seeds.shape != (B,):
            raise ValueError(f"seeds must have one entry per sample ({B}), got shape {tuple(seeds.shape)}")
    if opts.mask is not None and opts.known is None:
        raise ValueError("mask needs known (the known image)")
    mask_t = known_t = None  # contiguous (any layout is accepted; the fused step reads them flat)
    if opts.mask is not None:
        mask_t, known_t = (t.contiguous() if isinstance(t, torch.Tensor) else t for t in (opts.mask, opts.known))
    sums = torch.zeros(len(rows), dtype=torch.float32, device=dev) if opts.check_finite else None
    cg = classifier_coefficients(plan, opts.classifier_scale) if opts.classifier is not None else None
    if opts.classifier is not None:
        y = opts.classifier_y
        if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"classifier guidance needs classifier_y, an integer tensor of shape ({B},), got "
                             f"{type(y).__name__ if not isinstance(y, torch.Tensor) else (y.dtype, tuple(y.shape))}")
        y = y.to(device=dev, dtype=torch.int64)
    packed = [pack_row(r, cg[i] if cg is not None else 0.0, fold=True) for i, r in enumerate(rows)]
    noise_dtype = getattr(torch, plan.noise_dtype) if plan.noise_dtype else x.dtype

    it = range(len(rows))
    if opts.progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"fastdiff {plan.sampler}", total=len(rows))
    tm = opts.timer
    region = tm.region if tm is not None else _no_region
    backend = None  # resolved once; the step's tensors are validated whenever their kind changes
    checked = None
    all_dims = tuple(range(x.dim()))

    def run_rows(x: torch.Tensor, it) -> None:
        nonlocal backend, checked
        for i in it:
            r = rows[i]
            if tm is not None:
                tm.start_row(i)
            with region("model"):
                x_in = x * r.in_scale if r.in_scale != 1.0 else x
                if guided[i]:
                    cin = cond_cat if cond_cat is not None else opts.uncond
                    out = _call(model, torch.cat([x_in, x_in], dim=0), ts[i].expand(2 * B), cin)
                    _check_shape(out, (2 * B, *x.shape[1:]), i, r)
                    # any layout or dtype the model returns: the step takes x's dtype, contiguous
                    # (detached: a model may enable grad inside; the step is not differentiable)
                    out = out.detach().to(x.dtype).contiguous()
                    m, m_c = out[:B], out[B:]
                else:
                    out = _call(model, x_in, ts[i].expand(B), opts.cond)
                    _check_shape(out, tuple(x.shape), i, r)
                    out = out.detach()
                    m, m_c = out.to(x.dtype).contiguous(), None
            w = W[i] if m_c is not None else None
            rr = s = None
            clip = clip_code(r)
            grad = None
            with region("guidance"):
                if cg is not None and cg[i] != 0.0:
                    grad = classifier_grad(opts.classifier, x_in, ts[i].expand(B), y).to(x.dtype).contiguous()
                if sums is not None:
                    torch.sum(out, dim=all_dims, dtype=torch.float32, out=sums[i])
                if m_c is not None and g.rescale > 0:
                    rr = rescale_factor(m, m_c, w, g.rescale)
                if clip == 1:
                    s = s_static
                elif clip == 2:
                    s = dynamic_threshold(_x0(x, m, m_c, w, rr, r), plan.threshold_ratio, plan.threshold_max)
            z = None
            if r.noise and (opts.noise_fn is not None or opts.generator is not None):
                with region("noise"):
                    if opts.noise_fn is not None:
                        z = opts.noise_fn(i, x)
                    else:
                        z = draw_noise(tuple(x.shape), opts.generator, noise_dtype, dev)
                    z = _external_noise(z, x, i)
            z2 = None
            if opts.mask is not None and r.known_s != 0 and opts.generator is not None:
                with region("noise"):  # the known region's re-noising, drawn after the solver noise
                    z2 = draw_noise(tuple(x.shape), opts.generator, noise_dtype, dev).to(dtype=x.dtype, device=dev)
            if opts.callback is not None:
                x0 = _x0(x, m, m_c, w, rr, r, s, clip)
            coef = packed[i]
            if r.snr:  # Langevin corrector: its step size is a per-sample reduction (langevin_operands)
                with region("guidance"):
                    m, rr, z, coef = langevin_operands(plan, r, i, x, m, m_c, w, rr, grad, packed[i], z, seeds,
                                                       opts.backend)
                m_c = w = grad = None
            args = StepArgs(
                x=x, out=x, m=m, m_c=m_c, coef=coef, row=i,
                h_read=tuple(hist[k] for k in r.reads), h_write=tuple(hist[wr.slot] for wr in r.writes),
                w=w, r=rr, s=s, clip=clip, seeds=seeds, z=z, z2=z2,
                mask=mask_t, known=known_t, g=grad,
            )
            with region("step"):
                sig = (m_c is None, rr is None, s is None, z is None, z2 is None, grad is None, len(r.reads), len(r.writes))
                if sig != checked:
                    ops.validate(args)
                    checked = sig
                if backend is not None and backend.supports(args):
                    backend.step(args)
                elif ops.requested_backend(opts.backend) != "reference" and ops.needs_staging(args):
                    # e.g. a model output that partly overlaps the state: run on contiguous copies
                    ops.step(args, opts.backend, check=False)
                else:
                    backend = ops.resolve(opts.backend, args)
                    backend.step(args)
            if opts.post_step is not None:
                opts.post_step(i, x)
            if opts.callback is not None:
                opts.callback(r.step, r.sigma, x, x0)

    if opts.cuda_graph:
        _run_graphed(run_rows, x, len(rows))
    else:
        run_rows(x, it)
    if tm is not None:
        tm.end()
    if sums is not None:
        bad = ~torch.isfinite(sums)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteError(f"model output has NaN or Inf at step {rows[i].step} (row {i}, sigma {rows[i].sigma:.6g})")
    if plan.out_scale != 1.0:
        x.mul_(plan.out_scale)
    return x


class GraphCaptureError(RuntimeError):
    """The sampling loop (model included) could not be captured as a CUDA graph."""


def _check_graphable(opts: "LoopOptions", x: torch.Tensor) -> None:
    """Raise ``ValueError`` listing every reason the loop cannot be captured (before any work)."""
    problems = []
    if x.device.type != "cuda":
        problems.append(f"needs CUDA tensors, got noise on {x.device}")
    host = {"generator": opts.generator, "noise_fn": opts.noise_fn, "callback": opts.callback,
            "post_step": opts.post_step, "timer": opts.timer, "classifier": opts.classifier}
    bad = [k for k, v in host.items() if v is not None] + (["progress"] if opts.progress else [])
    if bad:
        problems.append(f"cannot capture {', '.join(bad)} (host-side work inside the loop); use seed= (in-kernel "
                        "Philox noise) and no per-step Python hooks")
    # A tensor on another device would be copied to x's device inside the graph: a pageable
    # host-to-device copy cannot be captured, and a cross-device copy runs outside the graph.
    for name, c in (("cond", opts.cond), ("uncond", opts.uncond), ("mask", opts.mask), ("known", opts.known)):
        items = c.items() if isinstance(c, dict) else [(None, c)]
        for key, t in items:
            if isinstance(t, torch.Tensor) and t.device != x.device:
                label = name if key is None else f"{name}[{key!r}]"
                problems.append(f"needs {label} on {x.device}, got {t.device}")
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        problems.append("was called while a CUDA graph is being captured (its warm-up pass and set-up copies "
                        "would be recorded into that graph)")
    if problems:
        raise ValueError("cuda_graph=True " + "; ".join(problems) + " (or use cuda_graph=False)")


GRAPH_WARMUP_PASSES = 1
"""Eager passes of the whole loop before the capture. One suffices: every row runs, so every model
call variant (guided ``2B`` and unguided ``B`` batches), every kernel specialisation and Triton
autotuning key, cuBLAS/cuDNN handle and workspace on the capture stream is initialised once."""


def _run_graphed(run_rows: Callable, x: torch.Tensor, n: int, cuda=None) -> None:
    """Warm the loop up on a copy (lazy initialisation, autotuning), capture it, replay it once.

    PyTorch's rules for ``torch.cuda.graph`` (CUDA semantics, "CUDA Graphs") and how they are met:

    - warm-up on a side stream before capture: ``GRAPH_WARMUP_PASSES`` eager passes on a copy of
      ``x`` on the stream ``side``, which waits for the caller's stream first; the caller's stream
      waits for ``side`` after;
    - the capture runs on that same stream (``stream=side``), so per-stream lazy state (cuBLAS /
      hipBLASLt handles and workspaces) created by the warm-up is reused and nothing is created
      inside the capture;
    - every tensor the graph reads or writes outside its private pool (``x``, history ring, seeds,
      per-row tables, conditioning) is allocated before the capture and outlives the replay;
    - everything runs with ``x``'s device current (the capture stream and every launch on it);
    - nothing runs during the capture, so ``x`` still holds the initial state when it is replayed,
      on the caller's current stream;
    - a failed capture raises :class:`GraphCaptureError` naming the first error (not the one
      ``capture_end`` raises after it) and leaves the caller's stream current.

    ``cuda`` is ``torch.cuda`` (replaceable to test this control flow without a GPU).
    """
    cuda = torch.cuda if cuda is None else cuda
    with cuda.device(x.device):
        caller = cuda.current_stream(x.device)
        side = cuda.Stream(device=x.device)
        warm = torch.empty_like(x)
        side.wait_stream(caller)
        with cuda.stream(side):
            for _ in range(GRAPH_WARMUP_PASSES):
                warm.copy_(x)
                run_rows(warm, range(n))
        caller.wait_stream(side)
        del warm
        graph = cuda.CUDAGraph()
        first: list[BaseException] = []
        try:
            # the outer context restores the caller's stream even when the capture fails: when
            # capture_end() raises, torch.cuda.graph's __exit__ leaves the capture stream current
            with cuda.stream(caller), cuda.graph(graph, stream=side):
                try:
                    run_rows(x, range(n))
                except BaseException as exc:  # the root cause; ending the capture raises its own error
                    first.append(exc)
                    raise
        except Exception as exc:  # the model (or an option) did something a graph cannot record
            cause = first[0] if first else exc
            raise GraphCaptureError(
                f"the sampling loop could not be captured as one CUDA graph: {type(cause).__name__}: {cause}. "
                "The model must not synchronise with the host (.item(), .cpu(), printing tensors, "
                "data-dependent shapes), copy from host memory or allocate outside PyTorch; run with "
                "cuda_graph=False") from cause
        graph.replay()


def classifier_coefficients(plan: Plan, scale: float) -> list[float]:
    """Per row ``c_g`` with ``e += c_g * g`` shifting the data estimate by ``scale * sigma_t^2/alpha_t * g``.

    ``g = grad_u log p(y | u)`` at the model input ``u = alpha_t x0 + sigma_t eps``, so by Tweedie's
    formula the data estimate moves from ``E[x0|u]`` to ``E[x0|u, y]`` (Dhariwal & Nichol 2021's
    ``eps - sqrt(1 - abar) * s * grad`` for eps models), with the scale ``s`` as inverse temperature.
    """
    out = []
    eps_estimate = plan.meta.get("estimate") == "eps"
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
        if logits.dim() != 2 or logits.shape[0] != u.shape[0]:
            raise ValueError(f"classifier must return logits [B, classes], got shape {tuple(logits.shape)}")
        logp = torch.log_softmax(logits.to(uu.dtype), dim=1).gather(1, y[:, None]).sum()
        (g,) = torch.autograd.grad(logp, uu)
    return g


_NOISE_ROW = Row(t=0.0, sigma=0.0, in_scale=1.0, a_x=0.0, a_e=0.0, out=combo(z=1.0), noise=True)
"""A row whose output is its own Philox noise (used to draw a Langevin row's noise)."""


def langevin_operands(plan: Plan, row, i: int, x, m, m_c, w, rr, grad, coef, z, seeds, backend: str = "auto"):
    """Operands of a Langevin corrector row (``row.snr > 0``, see :mod:`fastdiff.plan`).

    Computes the score ``g = l_x x + l_e e`` of the fully guided model output (``l`` from
    :func:`fastdiff.plan.score_coeffs`), draws ``z`` where the kernel would (Philox stream 0 at
    this row, unless given), and the step ``k[b] = 2 (snr ||z[b]|| / ||g[b]||)^2`` with norms per
    sample or their batch means (``plan.snr_norm``), in the order diffusers' ``step_correct`` uses.
    Returns ``(m, r, z, coef)`` for the kernel: ``m = g``, ``r = k`` (float32 ``[B]``),
    ``z = sqrt(2k) z`` and ``coef`` without the classifier term (``g`` already holds it), so the
    row's ``out = combo(x=1, e=1, z=1)`` gives ``x' = x + k g + sqrt(2k) z``.
    """
    from .args import C_G

    dt = compute_dtype(x.dtype)
    b, nd = x.shape[0], x.dim()
    col = (-1,) + (1,) * (nd - 1)
    e = m.to(dt)
    if m_c is not None:
        e = e + w.to(dt).reshape(col) * (m_c.to(dt) - e)
    if rr is not None:
        e = rr.to(dt).reshape(col) * e
    if grad is not None:
        e = e + coef[C_G] * grad.to(dt)
    l_x, l_e = score_coeffs(row.a_x, row.a_e, row.alpha_t, row.sigma_t, row.in_scale)
    g = l_e * e if l_x == 0.0 else l_x * x.to(dt) + l_e * e
    if z is None:  # the row's Philox noise, drawn by the step backend itself (x' = z): one fast pass
        buf = torch.zeros_like(x)  # finite operands: 0 * x must be 0
        ops.step(StepArgs(x=buf, out=buf, m=buf, coef=pack_row(_NOISE_ROW), row=i, seeds=seeds), backend)
        z = buf
    z = z.to(dt)
    g_norm = torch.linalg.vector_norm(g.reshape(b, -1), dim=-1)
    z_norm = torch.linalg.vector_norm(z.reshape(b, -1), dim=-1)
    if plan.snr_norm == "batch":
        g_norm, z_norm = g_norm.mean().expand(b), z_norm.mean().expand(b)
    k = (row.snr * z_norm / g_norm) ** 2 * 2
    zk = ((k * 2) ** 0.5).reshape(col) * z
    coef = coef[:C_G] + (0.0,) + coef[C_G + 1:]
    return g.to(x.dtype), k.to(torch.float32).contiguous(), zk.to(x.dtype), coef


def _external_noise(z, x: torch.Tensor, i: int) -> torch.Tensor:
    """``noise_fn``'s tensor for row ``i`` as the step takes it: ``x``'s shape (never broadcast), dtype, device, contiguous."""
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"noise_fn must return a tensor of the state's shape {tuple(x.shape)} at row {i}, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    return z.to(dtype=x.dtype, device=x.device).contiguous()


def _check_shape(out, expected, i, r) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor (wrap diffusers/k-diffusion models with fastdiff.denoisers), "
                        f"got {type(out).__name__}")
    if tuple(out.shape) != tuple(expected):
        raise ValueError(f"model output at step {r.step} has shape {tuple(out.shape)}, expected {tuple(expected)}")


def _x0(x, m, m_c, w, rr, row, s=None, clip=0) -> torch.Tensor:
    """The row's data estimate in float32 (for callbacks and the threshold quantile)."""
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
