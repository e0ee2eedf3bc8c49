"""The whole sampling loop as one CUDA graph, captured once and replayed by later calls.

An :class:`fastdiff.runtime.executor.Executor` asked to run graphed (``fastdiff.sample(..., cuda_graph=True)``,
``fastdiff.Sampler(..., cuda_graph=True)``) keeps one captured graph of its loop: the model calls,
guidance reductions and fused steps of every row, reading the initial state, the seeds, the
conditioning, ``mask`` and ``known`` from static buffers. A call copies its inputs into those
buffers, replays the graph and returns a copy of the static result.

The graph is captured again (one eager warm-up pass and one capture) when what it recorded would
no longer be right:

- another model object (the innermost object of a ``__wrapped__`` chain, so a fresh
  :func:`fastdiff.models.denoisers.as_model` wrapper of the same model is the same model);
- the model's parameters or buffers *replaced* rather than updated in place (their ``data_ptr``\\ s
  are compared on every call; ``load_state_dict`` and in-place optimiser steps keep them, while
  ``module.to(...)``, assigning a new ``nn.Parameter`` or ``torch.compile`` swapping modules do not);
- conditioning of another structure (keys, shapes, dtypes, devices, non-tensor values), or
  inpainting switched on or off.

A new batch size, shape, dtype or device is another executor altogether (``fastdiff.sample`` keys
its cache by them; a :class:`fastdiff.Sampler` refuses them). What cannot be detected cheaply, and
so is not: a model whose Python control flow depends on something other than its inputs (a
global flag, the call count), or that reads tensors other than its parameters and buffers which
are replaced between calls. Such a model must run with ``cuda_graph=False``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GRAPH_WARMUP_PASSES = 1
"""Eager passes of the whole loop before the capture. One suffices: every row runs, so every model
call variant (guided ``2B`` and unguided ``B`` batches), every kernel specialisation and Triton
autotuning key, cuBLAS/cuDNN handle and workspace on the capture stream is initialised once."""


class GraphCaptureError(RuntimeError):
    """The sampling loop (model included) could not be captured as a CUDA graph."""


def check_graphable(device: torch.device, *, generator=None, noise_fn=None, callback=None, post_step=None,
                    timer=None, classifier=None, progress=False, cond=None, uncond=None, mask=None,
                    known=None) -> None:
    """Raise ``ValueError`` listing every reason the loop cannot be captured (before any work)."""
    problems = []
    if device.type != "cuda":
        problems.append(f"needs CUDA tensors, got noise on {device}")
    host = {"generator": generator, "noise_fn": noise_fn, "callback": callback, "post_step": post_step,
            "timer": timer, "classifier": classifier}
    bad = [k for k, v in host.items() if v is not None] + (["progress"] if progress else [])
    if bad:
        problems.append(f"cannot capture {', '.join(bad)} (host-side work inside the loop); use seed= (in-kernel "
                        "Philox noise) and no per-step Python hooks")
    # A tensor on another device would be copied to the noise's device inside the graph: a pageable
    # host-to-device copy cannot be captured, and a cross-device copy runs outside the graph.
    for name, c in (("cond", cond), ("uncond", uncond), ("mask", mask), ("known", known)):
        items = c.items() if isinstance(c, dict) else [(None, c)]
        for key, t in items:
            if isinstance(t, torch.Tensor) and t.device != device:
                label = name if key is None else f"{name}[{key!r}]"
                problems.append(f"needs {label} on {device}, got {t.device}")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        problems.append("was called while a CUDA graph is being captured (its warm-up pass and set-up copies "
                        "would be recorded into that graph)")
    if problems:
        raise ValueError("cuda_graph=True " + "; ".join(problems) + " (or use cuda_graph=False)")


def model_chain(model: Callable) -> list:
    """``model`` and what it wraps (``__wrapped__``; a bound method's ``__self__``), outermost first."""
    chain, seen = [], set()
    m = model
    while m is not None and id(m) not in seen:
        seen.add(id(m))
        chain.append(m)
        m = getattr(m, "__wrapped__", None) or getattr(m, "__self__", None)
    return chain


def model_key(model: Callable) -> tuple:
    """What identifies the model a graph recorded: the innermost object of its wrapper chain and
    the addresses of every parameter and buffer of each ``nn.Module`` in the chain."""
    chain = model_chain(model)
    ptrs = []
    for m in chain:
        if isinstance(m, torch.nn.Module):
            ptrs.extend(t.data_ptr() for t in m.parameters())
            ptrs.extend(t.data_ptr() for t in m.buffers())
    return id(chain[-1]), tuple(ptrs)


def structure(c) -> tuple:
    """The structure of a conditioning a graph recorded: keys, tensor shapes, dtypes and devices,
    and the values of everything else."""
    if isinstance(c, dict):
        return ("dict", tuple((k, structure(v)) for k, v in c.items()))
    if isinstance(c, torch.Tensor):
        return ("tensor", tuple(c.shape), c.dtype, c.device, c.stride())
    if isinstance(c, (list, tuple)):
        return (type(c).__name__, tuple(structure(v) for v in c))
    try:
        hash(c)
        return ("value", c)
    except TypeError:
        return ("object", id(c))


def static_copy(c):
    """Static buffers holding a copy of a conditioning (same structure; tensors cloned)."""
    if isinstance(c, dict):
        return {k: static_copy(v) for k, v in c.items()}
    if isinstance(c, torch.Tensor):
        return c.detach().clone()
    return c


def load(static, c) -> None:
    """Copy the tensors of the conditioning ``c`` into ``static`` (of the same structure)."""
    if isinstance(c, dict):
        for k, v in c.items():
            load(static[k], v)
    elif isinstance(c, torch.Tensor):
        static.copy_(c)


def capture(body: Callable[[], None], device: torch.device, cuda=None):
    """Warm ``body`` up (lazy initialisation, autotuning) and capture it as a CUDA graph; returns
    the graph, not replayed. ``body`` runs the whole loop from its static inputs, so the warm-up
    and the capture leave nothing behind that a replay needs.

    PyTorch's rules for ``torch.cuda.graph`` (CUDA semantics, "CUDA Graphs") and how they are met:

    - warm-up on a side stream before capture: ``GRAPH_WARMUP_PASSES`` eager passes on the stream
      ``side``, which waits for the caller's stream first; the caller's stream waits for ``side``
      after;
    - the capture runs on that same stream (``stream=side``), so per-stream lazy state (cuBLAS /
      hipBLASLt handles and workspaces) created by the warm-up is reused and nothing is created
      inside the capture;
    - every tensor the graph reads or writes outside its private pool (state, history ring, model
      input, seeds, per-row tables, static conditioning) is allocated before the capture and is
      kept by the executor as long as the graph;
    - everything runs with ``device`` current (the capture stream and every launch on it);
    - a failed capture raises :class:`GraphCaptureError` naming the first error (not the one
      ``capture_end`` raises after it) and leaves the caller's stream current.

    ``cuda`` is ``torch.cuda`` (replaceable to test this control flow without a GPU). The graph
    carries ``body`` as ``graph.fd_body`` (so a stand-in's replay can run it).
    """
    cuda = torch.cuda if cuda is None else cuda
    with cuda.device(device):
        caller = cuda.current_stream(device)
        side = cuda.Stream(device=device)
        side.wait_stream(caller)
        with cuda.stream(side):
            for _ in range(GRAPH_WARMUP_PASSES):
                body()
        caller.wait_stream(side)
        graph = cuda.CUDAGraph()
        first: list[BaseException] = []
        try:
            # the outer context restores the caller's stream even when the capture fails: when
            # capture_end() raises, torch.cuda.graph's __exit__ leaves the capture stream current
            with cuda.stream(caller), cuda.graph(graph, stream=side):
                try:
                    body()
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
        graph.fd_body = body
    return graph
