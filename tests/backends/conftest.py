"""Backend tests: run Triton kernels on CPU tensors through the interpreter where there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, i.e. when ``fastdiff.kernels.step`` is
first imported, so it is set here, at collection, before any test imports the kernels. An explicit
``TRITON_INTERPRET`` in the environment wins; with a GPU the kernels are compiled for it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
