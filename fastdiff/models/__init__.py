"""Models: exact closed-form models for tests and benchmarks, denoiser wrappers, and the zoo.

- :mod:`~fastdiff.models.mixture`: Gaussian mixtures whose exact denoisers make sampling error measurable;
- :mod:`~fastdiff.models.denoisers`: adapters from diffusers UNets and k-diffusion denoisers;
- :mod:`~fastdiff.models.zoo`: small trained models with SHA-256-checked weights.
"""

from .mixture import GaussianMixture

__all__ = ["GaussianMixture"]
