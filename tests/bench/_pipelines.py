"""Pipeline factories for ``fastdiff profile --pipeline tests.bench._pipelines:NAME`` (tiny, offline)."""

from __future__ import annotations

from fastdiff.bench.pipeline import tiny_case, tiny_pipeline


def flux():
    """``(pipe, call_kwargs)``: the tiny FluxPipeline with true CFG, 8x8 latents (16 tokens), 2 steps."""
    return tiny_case("flux", latent=8, steps=2)


def sd_bare():
    """A bare tiny StableDiffusionPipeline (its own text encoder: the profiler calls it with a prompt)."""
    return tiny_pipeline("sd", latent=8)


def not_a_pipeline():
    """A factory that returns something else: ``--pipeline`` must say so."""
    return object(), {}


def bad_call():
    """A pipeline whose call arguments it does not take: the call fails, named."""
    pipe, kw = tiny_case("sd", latent=8, steps=1)
    return pipe, {**kw, "no_such_argument": 1}
