"""The ``fastdiff`` command line: ``info``, ``bench``, ``sample`` and ``profile``.

A bad argument ends in one line, ``fastdiff CMD: error: ...`` naming the flag, and exit status 2,
checked before any work is done or any file written; never a traceback."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the backends available and why the others are not."""
    from . import __version__
    from .runtime import ops

    print(f"fastdiff {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - report any import failure
        print(f"triton: not importable ({type(exc).__name__}: {exc})")
    cuda = torch.cuda.is_available()
    print(f"cuda: {'yes, ' + torch.cuda.get_device_name(0) if cuda else 'no GPU visible'}")
    env = os.environ.get("FASTDIFF_BACKEND", "")
    if env and env != "auto" and env not in ops.BACKENDS:
        env += f" (not a backend: --backend auto will fail; use one of auto, {', '.join(ops.BACKENDS)})"
    print(f"threads: {torch.get_num_threads()}  FASTDIFF_BACKEND={env or '(unset)'}")
    print("backends:")
    for name, (ok, why) in ops.available_backends().items():
        print(f"  {name:<10} {'available' if ok else 'unavailable':<12} {why}")
    return 0


def _shapes(text: str, flag: str) -> list[list[int]] | None:
    """``"1,4,64,64;2,3,512,512"`` -> ``[[1, 4, 64, 64], [2, 3, 512, 512]]`` (``None`` for ``""``)."""
    if not text:
        return None
    try:
        shapes = [[int(v) for v in part.split(",")] for part in text.split(";") if part.strip()]
        if not shapes or any(not s or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        raise ValueError(f"{flag} must be shapes of comma-separated ints >= 1 joined by ';', got {text!r}") from None
    return shapes


def _bench_command(args: argparse.Namespace) -> str:
    """The ``fastdiff bench`` command line that reproduces ``args`` (options at their defaults left out)."""
    parts = ["fastdiff", "bench"]
    for key, value in vars(args).items():
        if key in ("cmd", "fn") or value in (None, "", False, 0):
            continue
        flag = "--" + key.replace("_", "-")
        if key in ("json", "png"):
            continue  # where the results go, not what was measured
        parts += [flag] if value is True else [flag, repr(value) if ";" in str(value) else str(value)]
    return " ".join(parts)


def _names(text: str, flag: str, allowed: tuple[str, ...]) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (empty entries dropped, repeats once), each among ``allowed``;
    ``None`` for ``""``."""
    if not text:
        return None
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{flag} must be comma-separated names among {', '.join(allowed)}; got {text!r}")
    return names


def _check_bench_args(args: argparse.Namespace) -> None:
    """The counts of ``fastdiff bench``: each must be >= 1 where given (``--threads``: >= 0)."""
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--step-repeats", args.step_repeats)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 1 (0: as configured), got {args.threads}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark loops, the fused step against what it replaces, GPU rows and pipelines: table, JSON, PNG."""
    from . import bench, samplers
    from .runtime import ops

    try:
        _check_bench_args(args)
        loop_shape = _shapes(args.shape, "--shape")
        if loop_shape is not None and (len(loop_shape) != 1 or len(loop_shape[0]) < 2):
            raise ValueError(f"--shape takes one shape of at least 2 sizes (batch, ...), got {args.shape!r}")
        step_shapes = _shapes(args.step_shapes, "--step-shapes")
        parts = _names(args.parts, "--parts", bench.PARTS) or list(bench.PARTS)
        dtypes = _names(args.dtypes, "--dtypes", tuple(bench.DTYPES))
        names = _names(args.samplers, "--samplers", tuple(samplers.available()))
        backends = _names(args.backends, "--backends", ops.BACKENDS)
        for name in backends or ():
            ok, why = ops.backend_status(name)
            if not ok:
                raise ValueError(f"--backends {name}: not available here ({why})")
        for flag, path in (("--json", args.json), ("--png", args.png if args.json and args.png != "-" else "")):
            if path:
                _check_out_file(path, flag)
        if args.json and not args.png:  # the chart goes next to the JSON: check that path too
            png = os.path.splitext(args.json)[0] + ".png"
            if os.path.isdir(png):
                raise ValueError(f"--json {args.json}: its chart path {png} is a directory; pass --png")
        if args.threads:
            torch.set_num_threads(args.threads)
            from .backends import cpu

            if getattr(cpu, "_C", None) is not None:
                cpu._C.set_num_threads(args.threads)
        over = dict(loop_shape=loop_shape[0] if loop_shape else None, loop_steps=args.steps,
                    loop_repeats=args.repeats, samplers=names, backends=backends, step_shapes=step_shapes,
                    sampler_shapes=step_shapes, step_dtypes=dtypes, step_repeats=args.step_repeats,
                    compile=False if args.no_compile else None)
        m = bench.machine()
        print(f"fastdiff bench{' --quick' if args.quick else ''}: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
              f"{m['torch_threads']} threads, SIMD {m['simd']}, GPU {m['gpu'] or 'none'}, "
              f"load average {m['loadavg_start']}", flush=True)
        doc = bench.run(parts, quick=args.quick, command=_bench_command(args), log=lambda msg: print(msg, flush=True),
                        **over)
    except ValueError as exc:
        print(f"fastdiff bench: error: {exc}", file=sys.stderr)
        return 2
    print()
    bench.print_tables(doc)
    print(f"\nload average {doc['machine']['loadavg_start']} -> {doc['machine']['loadavg_end']}; "
          f"seconds per part: {doc['elapsed_s']}")
    for part, why in doc["skipped"].items():
        print(f"skipped {part}: {why}")
    for part, err in doc["errors"].items():
        print(f"FAILED {part}: {err}")
    if args.json:
        png = args.png or os.path.splitext(args.json)[0] + ".png"
        try:
            if png != "-":
                why = bench.write_chart(doc, png)
                doc["chart"] = None if why else png
                print(f"chart skipped: {why}" if why else f"wrote {png}")
            bench.write_json(doc, args.json)
        except OSError as exc:
            print(f"fastdiff bench: error: cannot write results: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    return 1 if doc["errors"] else 0


def _gmm_model(shape: tuple[int, ...], schedule, prediction: str):
    """The built-in Gaussian mixture with its exact model under ``schedule``."""
    from .models import GaussianMixture

    def alpha_sigma(t):  # schedules compute on the host (numpy) whatever device t is on
        return schedule.alpha_sigma(t.detach().to("cpu", torch.float64).numpy())

    return GaussianMixture.default(shape).model(alpha_sigma, prediction)


def _digits_model(shape: tuple[int, ...], schedule, prediction: str):
    """The trained class-conditional digits denoiser (:mod:`fastdiff.models.zoo.digits`), eps under its own schedule."""
    from .models.zoo import digits

    if shape != digits.SHAPE:
        raise ValueError(f"--model digits samples shape {','.join(map(str, digits.SHAPE))}, got --shape "
                         f"{','.join(map(str, shape))}")
    if prediction != "eps":
        raise ValueError(f"--model digits predicts eps, got --prediction {prediction}")
    return digits.load_denoiser()


def _digits_defaults() -> dict:
    from .models.zoo import digits

    return {"shape": ",".join(map(str, digits.SHAPE)), "schedule": digits.schedule_config(),
            "null_class": digits.NULL, "num_classes": digits.NUM_CLASSES, "grid": True}


SAMPLE_MODELS = {"gmm": _gmm_model, "digits": _digits_model}
"""``fastdiff sample --model NAME``: name -> ``builder(shape, schedule, prediction) -> model(x, t)``."""
SAMPLE_MODEL_DEFAULTS = {"gmm": lambda: {"shape": "2"}, "digits": _digits_defaults}
"""Per built-in model: ``--shape`` and schedule config when not given; class-conditional models also
give ``null_class`` and ``num_classes`` (``--class``, ``--guidance-scale``) and ``grid`` (write a PNG grid)."""


def _sample_model(spec: str, shape: tuple[int, ...], schedule, prediction: str):
    """The model of ``--model``: a name in :data:`SAMPLE_MODELS`, or ``module:attr`` (a callable
    ``model(x, t)``, or a zero-argument factory named ``make_*``, as ``fastdiff profile --model``)."""
    from .bench.profile import load_model

    if spec in SAMPLE_MODELS:
        return SAMPLE_MODELS[spec](shape, schedule, prediction)
    if ":" not in spec or spec.startswith(":") or spec.endswith(":"):
        raise ValueError(f"--model must be one of {sorted(SAMPLE_MODELS)} or module:attr, got {spec!r}")
    if os.getcwd() not in sys.path:  # like `python -m`: modules next to the caller are importable
        sys.path.insert(0, os.getcwd())
    try:
        return load_model(spec)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None  # "model ...": the flag's name


def _sample_schedule(sampler: str, text: str, default: dict | None = None):
    """``(schedule, config)`` of ``--schedule``: a diffusers scheduler config as JSON text or a JSON
    file; default: the model's (``default``), else the sampler's (then ``config`` is ``None``). The
    config is what the resume manifest records: the file's content, not its path."""
    import json

    from . import samplers
    from .core import schedules

    if text:
        try:
            if text.lstrip()[:1] in ("{", "["):
                cfg = json.loads(text)
            else:
                with open(text) as f:
                    cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--schedule {text!r} is not valid JSON ({exc})") from None
        except OSError as exc:
            raise ValueError(f"--schedule {text}: cannot read it ({exc.strerror or exc}); give JSON text "
                             "or a .json file") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"--schedule must be a JSON object (a scheduler config), got {type(cfg).__name__}")
        try:
            return schedules.from_config(cfg), cfg
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"--schedule: {exc}") from None
    if default is not None:
        return schedules.from_config(default), default
    kinds = samplers.info(sampler).kinds
    if "vp" in kinds:
        return schedules.from_config({}), None
    return (schedules.FlowSchedule() if "flow" in kinds else schedules.VESchedule()), None


def _check_sample_args(args: argparse.Namespace, shape: tuple[int, ...]) -> None:
    """Refuse, naming the flag, what ``fastdiff sample`` cannot run, before anything is written."""
    import math

    from . import samplers
    from .bench.profile import check_device

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    from .core.validate import FLOAT32_MAX, MAX_STEPS, SEED_RANGE

    if not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be in [1, {MAX_STEPS}], got {args.steps}")
    if not (SEED_RANGE[0] <= args.seed and args.seed + args.num - 1 < SEED_RANGE[1]):
        raise ValueError(f"--seed must leave every sample's seed (--seed + i for i < --num) a 64-bit word in "
                         f"[{SEED_RANGE[0]}, {SEED_RANGE[1] - 1}], got --seed {args.seed} with --num {args.num}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale)
                                                and abs(args.guidance_scale) <= FLOAT32_MAX):
        raise ValueError(f"--guidance-scale must be finite (within float32), got {args.guidance_scale}")
    if args.sampler not in samplers.available():
        raise ValueError(f"--sampler must be one of {', '.join(samplers.available())}; got {args.sampler!r}")
    _check_backend(args.backend)
    if args.device:
        try:
            check_device(args.device)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None  # "device ...": the flag's name
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    if not os.path.exists(args.out):
        parent = os.path.dirname(os.path.abspath(args.out))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--out {args.out}: cannot create it ({parent} is not a writable folder)")
    elif not os.access(args.out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: not writable")
    if args.grid:
        _check_out_file(args.grid, "--grid")


def _check_sample_run(args: argparse.Namespace, model, shape: tuple[int, ...], dtype: torch.dtype, plan) -> None:
    """The backend can run these samples, and a ``module:attr`` model can be called, else a
    ``ValueError`` naming the flag (before ``--out`` is touched)."""
    from .bench.profile import _check_model, _probe_backend

    device = torch.device(args.device) if args.device else torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or '0')}" if torch.cuda.is_available() else "cpu")
    x = torch.zeros((1, *shape), dtype=dtype, device=device)
    name, why = _probe_backend(args.backend, x)
    if name is None:  # why: "backend 'X' was requested but is not available: ..."
        raise ValueError(f"{_backend_source(args.backend)}: {why}")
    if args.model not in SAMPLE_MODELS:
        try:
            _check_model(model, x * plan.init_scale, plan.rows[0].t)
        except ValueError as exc:
            raise ValueError(f"--model {args.model}: {exc}") from None


_RUN_FLAGS = ("model", "sampler", "steps", "prediction", "shape", "num", "seed", "dtype", "backend", "label",
              "guidance_scale")
"""The flags of ``fastdiff sample`` that determine the samples, recorded (with ``--schedule``'s
content) in the ``run`` part of the resume manifest (:mod:`fastdiff.distributed.manifest`)."""
_FLAG_NAMES = {"label": "--class"}


def _builtin_model_id(name: str) -> str | None:
    """The manifest's model identity of a built-in model (its weights' SHA-256 where it has weights);
    ``None`` for a ``module:attr`` model, which the manifest identifies by its tensors."""
    if name == "digits":
        from .models.zoo import digits

        return f"fastdiff.models.zoo.digits denoiser, weights sha256 {digits.weights_sha256('denoiser')}"
    if name in SAMPLE_MODELS:
        return f"fastdiff built-in {name} (exact, no weights)"
    return None


def _manifest_message(out: str, exc: ManifestError) -> str:
    """The manifest refusal in the command line's words: the differing flags (the plan and the other
    recorded settings follow from them), else every recorded difference."""
    flags = [(p.split(".", 2), a, b) for p, a, b in exc.differences if p.startswith("run.")]
    if not flags:
        return str(exc).replace(f"out_dir {out!r}", f"--out {out}").replace("out_dir", "--out")
    parts = []
    for (_, key, *sub), a, b in flags:
        flag = _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
        parts.append(f"{flag}{' ' + sub[0] if sub else ''} was {a!r}, now {b!r}")
    return (f"--out {out} holds samples of a run with other settings ({'; '.join(parts)}); choose another --out, "
            "or resume with the recorded settings")


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample ``--num`` seeds into ``--out`` (one file per sample), across every torchrun rank."""
    from . import distributed
    from .api import make_plan
    from .models.denoisers import as_model
    from .distributed.manifest import ManifestError

    try:
        defaults = SAMPLE_MODEL_DEFAULTS[args.model]() if args.model in SAMPLE_MODEL_DEFAULTS else {}
    except (ImportError, OSError, ValueError) as exc:
        print(f"fastdiff sample: error: --model {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    args.shape = args.shape or defaults.get("shape", "2")
    try:
        shape = _one_shape(args.shape, "--shape")
    except ValueError as exc:
        print(f"fastdiff sample: error: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0") or "0")
    try:
        _check_sample_args(args, shape)
        conds, unconds, guidance = _class_conditions(args, defaults)
        dtype = getattr(torch, args.dtype)
        schedule, schedule_config = _sample_schedule(args.sampler, args.schedule, defaults.get("schedule"))
        try:
            plan = make_plan(args.sampler, args.steps, schedule, args.prediction or None)
        except ValueError as exc:
            msg = str(exc)  # "prediction ..." / "sampler ... needs a flow schedule": name the flag
            raise ValueError(f"--{msg}" if msg.startswith(("prediction ", "sampler ")) else msg) from None
        model = _sample_model(args.model, shape, schedule, plan.prediction)
        grid = args.grid or (os.path.join(args.out, "grid.png") if defaults.get("grid") else "")
        if grid and not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)):
            raise ValueError(f"--grid needs one-channel images (shape H,W or 1,H,W), got --shape {args.shape}")
        _check_sample_run(args, as_model(model), shape, dtype, plan)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out {args.out}: cannot create it ({exc.strerror or exc})") from None
        seeds = [args.seed + i for i in range(args.num)]
        run = {k: getattr(args, k) for k in _RUN_FLAGS}
        run["schedule"] = schedule_config if schedule_config is not None else "(the sampler's default)"
        paths = distributed.sample(model, shape, seeds=seeds, out_dir=args.out, resume=args.resume,
                                   batch_size=args.batch_size, dtype=dtype, device=args.device or None,
                                   timeout=args.timeout, plan=plan, backend=args.backend,
                                   conds=conds, unconds=unconds, model_id=_builtin_model_id(args.model),
                                   record=run, **guidance)
        if grid and rank == 0:
            from .models.zoo import png

            png.write_png(grid, png.grid(torch.stack([distributed.load_sample(q)["sample"] for q in paths])))
    except distributed.RankFailedError as exc:
        print(f"fastdiff sample: error: {exc}", file=sys.stderr)
        return 1
    except ManifestError as exc:  # --out holds samples of another run
        print(f"fastdiff sample: error: {_manifest_message(args.out, exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # loop.NonFiniteError: the model returned NaN or Inf
        print(f"fastdiff sample: error: --model {args.model}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"fastdiff sample: error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:  # --out holds this run's files and --resume was not given
        print(f"fastdiff sample: error: {exc}", file=sys.stderr)
        return 2
    except (TypeError, ImportError, AttributeError, OSError) as exc:
        print(f"fastdiff sample: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1") or "1")
        print(f"fastdiff sample: {len(paths)} samples of shape {shape} in {args.out} "
              f"({args.sampler}, {args.steps} step{'s' if args.steps != 1 else ''}, "
              f"{world} process{'es' if world > 1 else ''})" + (f"; grid {grid}" if grid else ""))
    return 0


def _class_conditions(args: argparse.Namespace, defaults: dict):
    """``(conds, unconds, guidance kwargs)`` of ``--class`` / ``--guidance-scale`` for ``--num`` samples."""
    null = defaults.get("null_class")
    guided = args.guidance_scale is not None and args.guidance_scale != 1.0
    if args.label is None and not guided:
        return None, None, {}
    if null is None:
        raise ValueError(f"--class and --guidance-scale need a class-conditional built-in model (digits), "
                         f"got --model {args.model}")
    k = defaults["num_classes"]
    label = -1 if args.label is None else args.label
    if not -1 <= label < k:
        raise ValueError(f"--class must be in 0..{k - 1}, or -1 for unconditional, got {label}")
    if guided and label == -1:
        raise ValueError("--guidance-scale needs --class (a class to guide towards), got none or -1")
    conds = torch.full((args.num,), null if label == -1 else label, dtype=torch.int64)
    if not guided:
        return conds, None, {}
    return conds, torch.full((args.num,), null, dtype=torch.int64), {"guidance_scale": args.guidance_scale}


def _backend_source(backend: str) -> str:
    """What named the backend: ``--backend X``, or ``FASTDIFF_BACKEND=X`` behind ``--backend auto``."""
    env = os.environ.get("FASTDIFF_BACKEND", "")
    if (backend or "auto") == "auto" and env and env != "auto":
        return f"FASTDIFF_BACKEND={env} (what --backend auto uses)"
    return f"--backend {backend}"


def _check_backend(backend: str) -> None:
    """``--backend`` (or ``FASTDIFF_BACKEND`` behind ``auto``) is a backend name, else ``ValueError``."""
    from .runtime import ops

    try:
        ops.requested_backend(backend)
    except ValueError:
        raise ValueError(f"{_backend_source(backend)} must be one of auto, {', '.join(ops.BACKENDS)}") from None


def _one_shape(text: str, flag: str, min_dims: int = 1) -> tuple[int, ...]:
    """``"2,4,64,64"`` -> ``(2, 4, 64, 64)``; a ``ValueError`` naming ``flag`` otherwise."""
    try:
        shape = tuple(int(v) for v in text.split(","))
        if len(shape) < min_dims or min(shape) < 1:
            raise ValueError
    except ValueError:
        need = f"at least {min_dims} " if min_dims > 1 else ""
        raise ValueError(f"{flag} must be {need}comma-separated ints >= 1, got {text!r}") from None
    return shape


def _check_out_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or a file in a
    folder that cannot be created or written (the folder is created here)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


PROFILE_DEFAULTS = {"sampler": "dpmpp_2m", "shape": "2,4,64,64", "dtype": "float32",
                    "variants": "diffusers,reference,fused"}
"""``fastdiff profile``'s defaults of the options that ``--pipeline`` refuses (``None`` in argparse: given or not)."""
_NOT_WITH_PIPELINE = ("model", "sampler", "shape", "dtype", "variants", "guidance_scale", "trace")


def _profile_pipeline(args: argparse.Namespace, fail) -> int:
    """``fastdiff profile --pipeline module:attr``: the pipeline's stock loop vs ``accelerate``, per step."""
    from .bench.profile import _probe_backend, check_device, load_pipeline, profile_pipeline
    from .runtime import ops

    try:
        if args.model:
            raise ValueError("--model and --pipeline exclude each other: profile a model or a pipeline")
        for key in _NOT_WITH_PIPELINE:
            if getattr(args, key) not in (None, ""):
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{flag} does not apply to --pipeline (the pipeline's own scheduler, latents, "
                                 "dtype and guidance are profiled: set them in the pipeline and its call arguments)")
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        try:
            check_device(args.device)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None  # "device ...": the flag's name
        _check_backend(args.backend)
        name = ops.requested_backend(args.backend)
        probe, why = _probe_backend(name, torch.zeros(1, device=args.device))
        if probe is None and name != "auto":  # why: "backend 'X' was requested but is not available: ..."
            raise ValueError(f"{_backend_source(args.backend)}: {why}")
        if args.json:
            _check_out_file(args.json, "--json")
        if os.getcwd() not in sys.path:  # like `python -m` and --model: modules next to the caller
            sys.path.insert(0, os.getcwd())
        try:
            pipe, call_kwargs = load_pipeline(args.pipeline)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None  # "pipeline ...": the flag's name
    except ValueError as exc:
        return fail(str(exc))
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecation notes are not results
            rep = profile_pipeline(pipe, call_kwargs, steps=args.steps, backend=args.backend, device=args.device,
                                   warmup=args.warmup)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("backend "):
            return fail(f"{_backend_source(args.backend)}: {msg}")
        return fail(f"--pipeline {args.pipeline}: {msg}")
    except (TypeError, RuntimeError, AttributeError, IndexError, KeyError) as exc:  # the call itself failed
        return fail(f"--pipeline {args.pipeline}: the pipeline call failed ({type(exc).__name__}: {exc})")
    return _report(rep, args.json, fail)


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile one sampling loop (stock diffusers scheduler vs reference vs fused, part by part), or
    with ``--pipeline`` a diffusers pipeline's loop, stock vs accelerated."""
    import math

    from .bench.profile import VARIANTS, check_device, load_model, profile

    def fail(msg: str) -> int:
        print(f"fastdiff profile: error: {msg}", file=sys.stderr)
        return 2

    if args.pipeline:
        return _profile_pipeline(args, fail)
    for key, value in PROFILE_DEFAULTS.items():  # (None: not given, which only --pipeline needs to know)
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        shape = _one_shape(args.shape, "--shape", min_dims=2)
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        from . import samplers

        if args.sampler not in samplers.available():
            raise ValueError(f"--sampler must be one of {', '.join(samplers.available())}; got {args.sampler!r}")
        scale = args.guidance_scale
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"--guidance-scale must be finite, got {scale}")
        if scale is None:  # CFG needs the built-in model's conditioning: default 7.5 there, none for --model
            scale = 1.0 if args.model else 7.5
        if args.model and scale != 1.0:
            raise ValueError(f"--guidance-scale {scale:g} needs the built-in model (its conditioning); "
                             "with --model leave it out or give 1")
        scale = None if scale == 1.0 else scale
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        bad = [v for v in variants if v not in VARIANTS]
        if bad or not variants:
            raise ValueError(f"--variants must be comma-separated names among {','.join(VARIANTS)}, "
                             f"got {args.variants!r}")
        try:
            check_device(args.device)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None  # "device ...": the flag's name
        _check_backend(args.backend)
        model = None
        if args.model:
            if os.getcwd() not in sys.path:  # like `python -m` and `sample --model`: modules next to the caller
                sys.path.insert(0, os.getcwd())
            try:
                model = load_model(args.model)
            except ValueError as exc:
                raise ValueError(f"--{exc}") from None  # "model ...": the flag's name
        for flag, path in (("--json", args.json), ("--trace", args.trace)):
            if path:
                _check_out_file(path, flag)
    except ValueError as exc:
        return fail(str(exc))
    try:
        rep = profile(model, sampler=args.sampler, steps=args.steps, shape=shape,
                      dtype=getattr(torch, args.dtype), device=args.device, backend=args.backend,
                      guidance_scale=scale, variants=variants, trace=args.trace or None, warmup=args.warmup)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("backend "):
            msg = f"{_backend_source(args.backend)}: {msg}"
        elif msg.startswith("model"):
            msg = f"--model {args.model}: {msg}"
        return fail(msg)
    except FloatingPointError as exc:  # loop.NonFiniteError: the model returned NaN or Inf
        return fail(f"--model {args.model or '(built-in)'}: {exc}")
    except OSError as exc:
        return fail(f"{type(exc).__name__}: {exc}")
    status = _report(rep, args.json, fail)
    if status:
        return status
    if args.trace:
        print(f"wrote Chrome trace {args.trace}")
    return 0


def _report(rep, json_path: str | None, fail) -> int:
    """Print a profile's table and write its JSON to ``json_path`` (``fail``'s status when it cannot)."""
    import json

    print(rep.table())
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump(rep.to_json(), f, indent=1)
        except OSError as exc:
            return fail(f"--json {json_path}: {exc.strerror or exc}")
        print(f"wrote {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastdiff`` console script."""
    p = argparse.ArgumentParser(prog="fastdiff", description="Fused diffusion sampling: info and benchmarks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and backends").set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="loops, the fused step vs what it replaces, GPU rows, pipelines: table, JSON, PNG")
    b.add_argument("--quick", action="store_true", help="a smoke run (under a minute on 2 cores)")
    b.add_argument("--parts", default="",
                   help="comma-separated parts among loop,floor,step,samplers,gpu,pipeline,guidance (default: all)")
    b.add_argument("--shape", default="", help="loop noise shape, comma-separated (default 16,4,32,32)")
    b.add_argument("--steps", type=int, default=None, help="loop steps (default 20; 4 with --quick)")
    b.add_argument("--repeats", type=int, default=None, help="timed loop runs; each model call and each stretch between calls keeps its minimum (default 3; 1 with --quick)")
    b.add_argument("--samplers", default="", help="comma-separated sampler names (default: all)")
    b.add_argument("--backends", default="", help="comma-separated backends (default: reference and cpu)")
    b.add_argument("--step-shapes", default="", help="step and per-sampler shapes, e.g. '1,4,64,64;2,3,512,512'")
    b.add_argument("--dtypes", default="", help="step dtypes among fp32,fp16,bf16 (default fp32,fp16; fp32 with --quick)")
    b.add_argument("--step-repeats", type=int, default=None, help="timed samples per step method (default 25; 5 with --quick)")
    b.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference step")
    b.add_argument("--threads", type=int, default=0, help="torch and kernel threads (default: as configured)")
    b.add_argument("--json", default="bench-results/bench.json", help="where to write JSON ('' to skip JSON and chart)")
    b.add_argument("--png", default="", help="where to write the chart (default: the JSON path with .png; '-' to skip)")
    b.set_defaults(fn=cmd_bench)
    sp = sub.add_parser("sample", help="sample seeds into a folder, one file per sample (works under torchrun)")
    sp.add_argument("--model", default="gmm",
                    help="gmm (built-in Gaussian mixture, exact), digits (trained 8x8 digits) or module:attr")
    sp.add_argument("--sampler", default="euler_ancestral", help="sampler name (fastdiff.samplers.available())")
    sp.add_argument("--steps", type=int, default=30)
    sp.add_argument("--schedule", default="", help="diffusers scheduler config: JSON text or a .json file")
    sp.add_argument("--prediction", default="", help="eps, v, x0 or flow (default: the sampler's)")
    sp.add_argument("--shape", default="", help="shape of one sample, comma-separated (default: the model's; 2 for gmm)")
    sp.add_argument("--class", dest="label", type=int, default=None,
                    help="class of every sample for class-conditional models (digits: 0-9; -1 = unconditional)")
    sp.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale with --class (default: none; 1 = none)")
    sp.add_argument("--grid", default="",
                    help="also write the samples as one PNG grid here (default for digits: OUT/grid.png)")
    # -n: under torchrun on Python < 3.12, torchrun's own parser rejects --num as an abbreviation of --numa-binding
    sp.add_argument("-n", "--num", type=int, default=100, help="number of samples (seeds SEED .. SEED+NUM-1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of sample 0")
    sp.add_argument("--out", required=True, help="folder for the per-sample files")
    sp.add_argument("--resume", action="store_true", help="keep the files already in --out, sample the rest")
    sp.add_argument("--batch-size", type=int, default=64, help="samples per sampling call on one rank")
    sp.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    sp.add_argument("--backend", default="auto", help="auto, reference, cpu, triton or cuda")
    sp.add_argument("--device", default="", help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    sp.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds a rank waits for the others after each batch before it gives up (default 1800)")
    sp.set_defaults(fn=cmd_sample)
    pr = sub.add_parser("profile", help="where each step's time goes: diffusers vs reference vs fused",
                        description="Profile a sampling loop (the built-in model or --model), or with --pipeline a "
                        "diffusers pipeline's denoising loop: stock vs fastdiff.diffusers.accelerate, per step the "
                        "model's forward time and the rest (CFG blend, scheduler step, loop overhead).")
    pr.add_argument("--model", default="", help="module:attr of a model(x, t) (default: built-in Gaussian mixture)")
    pr.add_argument("--pipeline", default="",
                    help="module:attr of a diffusers pipeline, or of a zero-argument callable returning a pipeline "
                    "or (pipeline, call_kwargs dict); it is called with call_kwargs (default: a prompt), "
                    "output_type='latent', --steps and a seeded generator unless given, stock then accelerated "
                    "(e.g. fastdiff.bench.pipeline:flux_case). Uses --steps, --device, --backend, --warmup, --json")
    pr.add_argument("--sampler", default=None, help="sampler name (default dpmpp_2m)")
    pr.add_argument("--steps", type=int, default=20)
    pr.add_argument("--shape", default=None, help="noise shape, comma-separated (default 2,4,64,64)")
    pr.add_argument("--dtype", default=None, choices=("float32", "float64", "float16", "bfloat16"),
                    help="noise dtype (default float32)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--backend", default="auto", help="the fused backend (auto, cpu, triton, cuda)")
    pr.add_argument("--guidance-scale", type=float, default=None,
                    help="CFG scale; 1 disables guidance (default: 7.5 with the built-in model, none with --model)")
    pr.add_argument("--variants", default=None, help="among diffusers,reference,fused (default: all three)")
    pr.add_argument("--warmup", type=int, default=1)
    pr.add_argument("--trace", default="", help="write a Chrome trace JSON here")
    pr.add_argument("--json", default="", help="write the report as JSON here")
    pr.set_defaults(fn=cmd_profile)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
