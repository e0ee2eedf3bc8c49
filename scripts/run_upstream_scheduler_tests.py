"""diffusers' OWN scheduler test suite, run against the stock schedulers and against fastdiff's drop-ins.

    python scripts/run_upstream_scheduler_tests.py /path/to/diffusers/tests [--modes class,wrap] [-k EXPR]

The argument is the ``tests`` folder of a diffusers checkout (at least ``tests/__init__.py``,
``tests/conftest.py``, ``tests/testing_utils.py``, ``tests/others/`` and ``tests/schedulers/``), ideally
of the release that is installed. It is NOT part of this repository nor of its CI (it needs that
checkout); for instance, from a clone of huggingface/diffusers::

    git archive v0.42.1 tests/__init__.py tests/conftest.py tests/testing_utils.py tests/others \\
        tests/schedulers | tar -x -C /tmp/upstream
    python scripts/run_upstream_scheduler_tests.py /tmp/upstream/tests

The suite runs once per mode, each in its own pytest process (junit XML under ``--out``):

``stock``
    as diffusers runs it.
``class``
    every scheduler class fastdiff has a drop-in for (:data:`fastdiff.diffusers.SUPPORT`) is replaced, in
    the test modules' namespaces and in the test classes' ``scheduler_classes``, by its drop-in class
    (``type(from_diffusers(X()))``): ``X(**config)``, ``X.from_config(...)``, ``X.from_pretrained(dir)``
    build drop-ins.
``wrap``
    the same names replaced by a factory class whose construction builds the STOCK scheduler and returns
    ``from_diffusers(stock)`` (so also ``from_config`` / ``from_pretrained``): the path of a user who
    wraps a scheduler they made.
``cross`` (only with ``--modes cross``)
    plain construction builds the stock scheduler, ``from_config`` / ``from_pretrained`` a drop-in of the
    stock one (``from_diffusers(X.from_config(...))``): the suite's ``scheduler`` vs ``new_scheduler``
    comparisons become stock vs drop-in, and its scheduler switches (``test_switch``) go through
    ``from_diffusers``. Strict: those comparisons ask ``sum |a - b| < 1e-5`` over 768 elements, so most
    of its failures are float32 rounding (``cross.log`` has each sum: ~1e-5 to 1e-3 on outputs summing
    to ~400 to 70000); tests that set a scheduler's history directly (``ets``, ``model_outputs``) differ.

The replacement is made after collection (every test module imported) and before any test runs; the
``diffusers`` namespace itself is left alone (``from_diffusers`` checks that a class is diffusers'
own). Each drop-in mode also counts the fused steps that ran (``fastdiff.runtime.ops.step``). Then it
prints the tests that pass stock and fail or error in a drop-in mode (each with the first line of
its error), and the counts; exit status 1 if there are any. Tests that do not pass stock (network:
the Hub) are ignored. About 6 minutes on two cores for the three modes.

Known differences (diffusers main of 2026-08-23 against diffusers 0.42.1, 998 tests; ``class`` and
``wrap``): three, none a drop-in bug. ``IPNDMSchedulerTest.test_full_loop_no_noise`` sets the private
``_step_index = None`` after a run and steps again on stock's stale ``ets`` history (the drop-in
starts that run afresh);
``SASolverSchedulerTest.test_full_loop_no_noise`` / ``..._with_v_prediction`` step without a
generator after ``torch.manual_seed(0)``: the drop-in's noise is then its own Philox stream, not
torch's global one (documented in :mod:`fastdiff.diffusers`; with a generator they match stock).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MODES = ("stock", "class", "wrap")


class DropInPlugin:
    """pytest plugin: the supported diffusers scheduler classes replaced by drop-ins in the test modules."""

    def __init__(self, mode: str):
        self.mode = mode
        self.fused_steps = 0

    def _replacements(self) -> dict:
        import diffusers

        from fastdiff.diffusers import SUPPORT, from_diffusers

        out = {}
        for name in SUPPORT:
            stock = getattr(diffusers, name, None)
            if stock is None:
                continue
            if self.mode == "class":
                out[stock] = type(from_diffusers(stock()))
            elif self.mode == "cross":
                out[stock] = _crossing(stock, from_diffusers)
            else:
                out[stock] = _wrapping(stock, from_diffusers)
        return out

    def pytest_collection_modifyitems(self, session, config, items):
        if self.mode == "stock":
            return
        import pytest

        repl = self._replacements()
        modules = {id(m.obj): m.obj for m in (i.getparent(pytest.Module) for i in items) if m is not None}
        # also the modules the collected ones import from (test_schedulers.py's SchedulerCommonTest reads ITS
        # module's names, e.g. `scheduler_class in (EulerDiscreteScheduler, ...)`, even when -k deselects its tests)
        root = str(Path(str(config.rootpath)).resolve())
        for mod in list(sys.modules.values()):
            f = getattr(mod, "__file__", None) or ""
            if f.startswith(root + os.sep) and "/tests/" in f:
                modules[id(mod)] = mod
        patched = 0
        for mod in modules.values():
            for k, v in list(vars(mod).items()):
                if isinstance(v, type) and v in repl:
                    setattr(mod, k, repl[v])
                    patched += 1
                if isinstance(v, type) and isinstance(vars(v).get("scheduler_classes"), tuple):
                    v.scheduler_classes = tuple(repl.get(c, c) for c in v.scheduler_classes)
        print(f"\n[fastdiff drop-in mode {self.mode}: {len(repl)} classes, {patched} module names replaced]")
        from fastdiff.runtime import ops

        step = ops.step

        def counted(*args, **kwargs):  # (the drop-ins' steps do run the fused step: counted)
            self.fused_steps += 1
            return step(*args, **kwargs)

        ops.step = counted

    def pytest_terminal_summary(self, terminalreporter):
        if self.mode != "stock":
            terminalreporter.write_line(f"[fastdiff drop-in mode {self.mode}: {self.fused_steps} fused steps ran]")


def _wrapping(stock: type, from_diffusers) -> type:
    """A subclass of ``stock`` whose construction (``cls(**config)``, and so ``from_config`` and
    ``from_pretrained``) builds the stock scheduler and returns ``from_diffusers`` of it."""

    def __new__(cls, *args, **kwargs):
        return from_diffusers(stock(*args, **kwargs))

    return type(stock.__name__, (stock,), {"__new__": __new__, "__module__": stock.__module__,
                                           "__qualname__": stock.__qualname__})


def _crossing(stock: type, from_diffusers) -> type:
    """A subclass of ``stock`` whose plain construction builds the STOCK scheduler and whose ``from_config``
    (so ``from_pretrained``) builds a drop-in: the suite's ``scheduler`` vs ``new_scheduler`` comparisons
    (``check_over_configs``, ``check_over_forward``: sum of |difference| < 1e-5) become stock vs drop-in."""

    def __new__(cls, *args, **kwargs):
        return stock(*args, **kwargs)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        got = stock.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        return (from_diffusers(got[0]), *got[1:]) if isinstance(got, tuple) else from_diffusers(got)

    return type(stock.__name__, (stock,), {"__new__": __new__, "from_config": from_config,
                                           "__module__": stock.__module__, "__qualname__": stock.__qualname__})


def _outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, last line of its message)."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        state, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                state = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (el.get("message") or el.text or "").strip().splitlines()
                msg = text[0][:200] if text else ""
                break
        out[tid] = (state, msg)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tests", type=Path, help="the tests folder of a diffusers checkout")
    ap.add_argument("--modes", default="class,wrap", help="drop-in modes to run besides stock (class, wrap, cross)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/upstream_scheduler_results"))
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    tests = args.tests.resolve()
    if args._run is not None:  # one pytest process of one mode
        import pytest

        os.chdir(tests.parent)
        return pytest.main([str(tests / "schedulers"), "-q", "-p", "no:cacheprovider", "-W", "ignore",
                            f"--junitxml={args.out / (args._run + '.xml')}", *(["-k", args.k] if args.k else []),
                            *rest], plugins=[DropInPlugin(args._run)])
    args.out.mkdir(parents=True, exist_ok=True)
    modes = ["stock"] + [m for m in args.modes.split(",") if m]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    for mode in modes:
        cmd = [sys.executable, __file__, str(tests), "--out", str(args.out), "--_run", mode,
               *(["-k", args.k] if args.k else []), *rest]
        print(f"== {mode}: {' '.join(cmd)}", flush=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (args.out / f"{mode}.log").write_text(r.stdout + r.stderr)
        print("\n".join((r.stdout.strip().splitlines() or [""])[-1:]), flush=True)
    res = {m: _outcomes(args.out / f"{m}.xml") for m in modes}
    stock = res["stock"]
    passed = {t for t, (s, _) in stock.items() if s == "passed"}
    print(f"\nstock: {len(passed)} passed of {len(stock)}")
    bad = 0
    for mode in modes[1:]:
        diff = sorted(t for t in passed if res[mode].get(t, ("missing", ""))[0] not in ("passed",))
        n_pass = sum(s == "passed" for s, _ in res[mode].values())
        print(f"{mode}: {n_pass} passed; {len(diff)} pass stock and not here")
        for t in diff:
            print(f"  {res[mode].get(t, ('missing', ''))[0]:8s} {t}\n           {res[mode].get(t, ('', ''))[1]}")
        bad += len(diff)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
