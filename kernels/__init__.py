"""Triton kernels of fastdiff (installed as ``fastdiff.kernels``); ``step`` is the fused sampler step."""
