"""Drop into diffusers: schedulers whose ``step`` is fastdiff's fused kernel, and accelerated pipelines.

Schedulers::

    from fastdiff.diffusers import from_diffusers
    pipe.scheduler = from_diffusers(pipe.scheduler)          # same config, same timesteps, fused step

:func:`from_diffusers` returns an instance of a dynamic subclass of the scheduler's own class
(same class name and module, so configs and ``save_pretrained`` stay diffusers'). Everything except
``step`` is diffusers' code: ``set_timesteps`` (every grid option diffusers has, custom
``timesteps``/``sigmas``/``mu``), ``scale_model_input``, ``add_noise``, ``set_begin_index``,
``timesteps``, ``sigmas``, ``init_noise_sigma``, ``order``, ``config``. After ``set_timesteps`` the
plan rows are built from the scheduler's OWN arrays (``timesteps``, ``sigmas``), so ``step`` call
``i`` of a run runs row ``i`` (Heun's two calls per step are two rows). Multistep history lives on
the scheduler object (``fastdiff_history``).

Noise: with ``generator`` (or ``variance_noise``) the noise is drawn exactly as diffusers draws it
(same shape, dtype and generator calls), so trajectories match the stock scheduler. Without one,
diffusers would draw from torch's global RNG; the fused step instead generates counter-based
Philox noise inside the kernel, keyed by a seed drawn from torch's global RNG at the first noisy
step after ``set_timesteps`` (so ``torch.manual_seed`` still makes runs reproducible, and the
noise does not depend on the device or the batch size — but it is not the stock scheduler's noise).
DDPM with a learned variance scales its noise per element before the kernel, so without a
generator it draws from torch's global RNG exactly as diffusers does.

``step`` returns what diffusers' step returns: its output class (``DDIMSchedulerOutput``, ...) or,
with ``return_dict=False``, a tuple of the same length. Where that includes ``pred_original_sample``
(DDPM, DDIM, Euler, Euler ancestral, Heun, LMS) the data estimate is computed only when it is read
(attribute, key, ``to_tuple``, tuple entry 1): the fused kernel does not write it, so a loop that
reads ``prev_sample`` only (every pipeline's ``step(...)[0]``) pays one pass over the tensors.

Supported classes, config options and ``step`` arguments are listed in :data:`SUPPORT` (see
:func:`support_table`). Any other config key or value, or a ``step`` argument the fused step
cannot honour, raises ``ValueError`` naming it. ``step``'s ``model_output``, ``timestep`` and
``sample`` are checked before anything runs: what diffusers' own step accepts is accepted with the
same result (a model output that broadcasts against the sample, 0-d tensors, a one-element timestep
tensor, a numpy model output in the classes whose arithmetic takes one); what makes it fail with an
unrelated error (a string or a list, several timesteps, a first timestep not in
``scheduler.timesteps``, shapes that do not broadcast, tensors on two devices) raises a
``TypeError`` / ``ValueError`` naming the argument. The one fallback: ``LMSDiscreteScheduler`` runs
that start later than step 0 (``set_begin_index``, img2img) use diffusers' own step, with a
warning, because diffusers' LMS then truncates its coefficient set in a way no plan row expresses.

Pipelines::

    from fastdiff.diffusers import accelerate, restore
    accelerate(pipe)     # pipe(...) now runs fastdiff's loop: one fused kernel per step, CFG blend inside
    restore(pipe)        # back to the stock __call__

Supported: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``.

Modules: :mod:`.support` (the class table), :mod:`.scheduler` (the fused scheduler),
:mod:`.pipelines` (accelerated pipelines), each importing only the one before it.
"""

from .pipelines import accelerate, restore
from .scheduler import from_diffusers
from .support import SUPPORT, support_table

__all__ = ["from_diffusers", "accelerate", "restore", "support_table", "SUPPORT"]
