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
the scheduler object (``fastdiff_history``). The position of a run's first call is diffusers' own
(``set_begin_index``, else its lookup of the timestep: the second match where the grid repeats it,
DPM-Solver / UniPC's last step where none matches; a Heun or KDPM2 run whose first call is a second
stage runs as diffusers runs it: as a first stage, pairing the calls from there). DDIM and DDPM
compute their step from the timestep VALUE, as diffusers' do: a timestep that is not in
``scheduler.timesteps`` gets its own row, built on demand and cached (DDIM: any integer ``t``, into
``t - num_train_timesteps // num_inference_steps``; DDPM: any ``t`` of its training grid before
``set_timesteps``, into ``t - 1``; after it diffusers' DDPM looks the value up, and fails where it
is not there: refused by name).

Precision: DDPM and DDIM rows take their scalars (``1 - abar_t / abar_prev``, the posterior
coefficients, the variances, ``sqrt(1 - abar_prev - std^2)``) in float32 exactly as diffusers' step
computes them, so that the drop-in follows the stock scheduler where float32 rounding decides the
result (a step between two close timesteps: ``1 - abar_t / abar_prev ~ 1e-4`` carries diffusers'
float32 error of ~1e-4 relative, and so does its step). :func:`fastdiff.sample` and the registered
``ddpm`` / ``ddim`` samplers keep their float64 coefficients (the more accurate step). The other
classes' rows come from the registered samplers (float64 coefficients from diffusers' float32
arrays; KDPM2 and KDPM2 ancestral: each call's row from its own float32 arrays at the call's index),
within 1e-5 of the stock step.

A step whose stock result is inf/NaN has no row: ``set_timesteps`` still plans the run, every other
step runs, and that step raises a ``ValueError`` naming it when it is run (``plan.meta["refused"]``).
So: the step after a zero-length one (a grid that repeats a timestep: ``set_timesteps(1000)`` on
DPM-Solver / UniPC, ``num_inference_steps == num_train_timesteps``) and every later step of that run;
UniPC's last step into sigma 0 where its update has no finite value; DDIM / DDPM at a timestep where
float32 ``alphas_cumprod`` is 0 with epsilon prediction and no ``clip_sample`` (zero terminal SNR's
t = 999, betas whose ``alphas_cumprod`` underflows), or where ``abar_t = abar_prev = 0``; DDIM
inversion from a level whose ``alphas_cumprod`` is 0 (epsilon, no ``clip_sample``) or negative; DDPM's
``fixed_large_log`` wherever it draws noise. With ``clip_sample`` an epsilon row at ``abar = 0`` runs:
diffusers clips its ``(x - m) / 0 = +-inf`` to ``+-clip_sample_range``, and so does the row.
Clip and threshold values are taken as diffusers takes them: read only where they are used
(``sample_max_value`` below 1 bounds the threshold below 1, as ``torch.clamp(s, 1, max)`` does), and
refused by name only where diffusers' step fails or divides by 0 with them.

Noise is drawn exactly as diffusers' step draws it (same shape, dtype and calls): ``variance_noise``
where given, else from ``generator``, else from torch's global RNG (the device's, as
``randn_tensor`` draws), so trajectories match the stock scheduler's with or without a generator,
and ``torch.manual_seed(...)`` before a run gives the stock run's noise. (``fastdiff.sample`` draws
counter-based Philox noise inside the kernel instead; the drop-in follows the library it replaces,
as :mod:`fastdiff.k_diffusion` does.)

``step`` returns what diffusers' step returns: its output class (``DDIMSchedulerOutput``, ...) or,
with ``return_dict=False``, a tuple of the same length. Where that includes ``pred_original_sample``
(DDPM, DDIM, Euler, Euler ancestral, Heun, LMS, EDM Euler, KDPM2, KDPM2 ancestral, DPM-Solver SDE) or
another estimate (LCM's ``denoised``, TCD's ``pred_noised_sample``) it is computed only when it is read
(attribute, key, ``to_tuple``, tuple entry 1): the fused kernel does not write it, so a loop that
reads ``prev_sample`` only (every pipeline's ``step(...)[0]``) pays one pass over the tensors.

DPMSolverSDEScheduler's noise comes from its own Brownian tree (torchsde, seeded by
``noise_sampler_seed`` or torch's global RNG at the first step, as diffusers seeds it), queried as
diffusers' step queries it and fed to the fused step; ``accelerate`` refuses it (its loop draws
noise from the generator).

Supported classes, config options and ``step`` arguments are listed in :data:`SUPPORT` (see
:func:`support_table`). Any other config key or value, or a ``step`` argument the fused step
cannot honour, raises ``ValueError`` naming it (not the keys of a compatible class that the class does
not take: ``X.from_config(other.config)`` keeps them in the config, and neither reads them). ``step``'s ``model_output``, ``timestep`` and
``sample`` are checked before anything runs: what diffusers' own step accepts is accepted with the
same result (a model output that broadcasts against the sample, 0-d tensors, a one-element timestep
tensor, a numpy model output in the classes whose arithmetic takes one, a numpy sample in EDM
DPM-Solver and PNDM, whose arithmetic makes it a tensor); what makes it fail with an
unrelated error (a string or a list, several timesteps, a first timestep diffusers' lookup does
not find, shapes that do not broadcast, tensors on two devices) raises a ``TypeError`` /
``ValueError`` naming the argument. One refusal where diffusers runs: SA-Solver's step takes
``tau_func`` of the timestep AS GIVEN, the rows that of ``scheduler.timesteps[i]``; a given timestep
whose tau differs (a first timestep not in the grid, which diffusers runs as the last step) is
refused by name. The one fallback: ``LMSDiscreteScheduler`` runs
that start later than step 0 (``set_begin_index``, img2img) use diffusers' own step, with a
warning, because diffusers' LMS then truncates its coefficient set in a way no plan row expresses.

Pipelines::

    from fastdiff.diffusers import accelerate, restore
    accelerate(pipe)     # pipe(...) now runs fastdiff's loop: one fused kernel per step, CFG blend inside
    restore(pipe)        # back to the stock __call__

Supported: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``, ``WanPipeline``, ``LTXPipeline``, and any modular pipeline (``*ModularPipeline``: its
scheduler and guider components are swapped for fused ones).

Modules: :mod:`.support` (the class table), :mod:`.scheduler` (the fused scheduler),
:mod:`.modular` (fused guider components and modular pipelines), :mod:`.pipelines` (accelerated
pipelines), each importing only the ones before it.
"""

from .modular import fused_guider, stock_guider
from .pipelines import accelerate, restore
from .scheduler import from_diffusers
from .support import SUPPORT, support_table

__all__ = ["from_diffusers", "accelerate", "restore", "fused_guider", "stock_guider", "support_table", "SUPPORT"]
