"""fastdiff.distributed.sample refuses bad arguments by name, before any work or file (issue 13).

Each case builds its arguments afresh and asserts: the exception type; that the message names the
argument (and matches the case's wording); that the model was never called; that nothing was
created under the test's folder (``out_dir`` included); and that no tensor the caller passed
changed. World size 1 (no ``WORLD_SIZE``): the original exception is raised.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdiff import distributed as D

from ._dist_worker import make_model
from .._plans import edm_euler_ancestral

SEEDS = [1, 2, 3]
N = len(SEEDS)
T = torch.linspace(-1, 1, N)


def t(*shape, **kw):
    return torch.arange(int(torch.tensor(shape).prod()), dtype=kw.pop("dtype", torch.float32), **kw).reshape(shape) / 7


def _cuda_missing():
    return not torch.cuda.is_available()


# (id, argument named, exception, message regex, overrides: tmp -> dict of sample() arguments, skip reason or None)
CASES = [
    # conds / unconds: ragged, mixed, ambiguous
    ("conds-ragged-shapes", "conds", ValueError,
     r"conds\[1\] has shape \(3,\) but conds\[0\] has shape \(2,\): per-sample entries are stacked",
     lambda tmp: {"conds": [t(2), t(3), t(2)]}, None),
    ("conds-ragged-last", "conds", ValueError, r"conds\[2\] has shape \(2, 1\) but conds\[0\] has shape \(2,\)",
     lambda tmp: {"conds": [t(2), t(2), t(2, 1)]}, None),
    ("conds-dtypes-differ", "conds", ValueError, r"conds\[1\] has dtype torch.float64 but conds\[0\] has dtype",
     lambda tmp: {"conds": [t(2), t(2, dtype=torch.float64), t(2)]}, None),
    ("conds-dict-keys-differ", "conds", ValueError,
     r"conds\[1\] has keys \['z'\] but conds\[0\] has \['y'\]: per-sample dicts must all have the same keys",
     lambda tmp: {"conds": [{"y": t(2)}, {"z": t(2)}, {"y": t(2)}]}, None),
    ("conds-dict-extra-key", "conds", ValueError, r"conds\[2\] has keys \['y', 'z'\] but conds\[0\] has \['y'\]",
     lambda tmp: {"conds": [{"y": t(2)}, {"y": t(2)}, {"y": t(2), "z": t(2)}]}, None),
    ("conds-dict-shapes-differ", "conds", ValueError, r"conds\[2\]\['y'\] has shape \(4,\) but conds\[0\]\['y'\]",
     lambda tmp: {"conds": [{"y": t(2)}, {"y": t(2)}, {"y": t(4)}]}, None),
    ("conds-nested-dict-shapes-differ", "conds", ValueError, r"conds\[1\]\['a'\]\['b'\] has shape \(1,\)",
     lambda tmp: {"conds": [{"a": {"b": t(2)}}, {"a": {"b": t(1)}}, {"a": {"b": t(2)}}]}, None),
    ("conds-dict-other-values-differ", "conds", ValueError,
     r"conds\[1\]\['scale'\] is 2 but conds\[0\]\['scale'\] is 1: values other than tensors are not stacked",
     lambda tmp: {"conds": [{"y": t(2), "scale": 1}, {"y": t(2), "scale": 2}, {"y": t(2), "scale": 1}]}, None),
    ("conds-scalar-among-tensors", "conds", TypeError, r"conds\[1\] must be a tensor like conds\[0\], got float 1.5",
     lambda tmp: {"conds": [t(), 1.5, t()]}, None),
    ("conds-list-among-tensors", "conds", TypeError, r"conds\[2\] must be a tensor like conds\[0\], got list",
     lambda tmp: {"conds": [t(2), t(2), [1.0, 2.0]]}, None),
    ("conds-scalars", "conds", TypeError, r"conds\[0\] must be a tensor or a dict \(one per sample\), got float 0.5",
     lambda tmp: {"conds": [0.5, 1.5, 2.5]}, None),
    ("conds-lists", "conds", TypeError, r"conds\[0\] must be a tensor or a dict \(one per sample\), got list",
     lambda tmp: {"conds": [[1.0], [2.0], [3.0]]}, None),
    ("conds-dict-list-in-items", "conds", TypeError, r"conds\[0\]\['y'\] is a list: per-sample values must be tensors",
     lambda tmp: {"conds": [{"y": [1, 2]}, {"y": [1, 2]}, {"y": [1, 2]}]}, None),
    ("conds-tensor-then-dict", "unconds", TypeError, r"unconds\[1\] must be a tensor like unconds\[0\], got dict",
     lambda tmp: {"unconds": [t(2), {"y": t(2)}, t(2)]}, None),
    ("unconds-dict-then-tensor", "unconds", TypeError, r"unconds\[1\] must be a dict like unconds\[0\], got Tensor",
     lambda tmp: {"unconds": [{"y": t(2)}, t(2), {"y": t(2)}]}, None),
    ("conds-dict-of-list", "conds", TypeError,
     r"conds\['y'\] is a list: per-sample values must be an \[N, \.\.\.\] tensor",
     lambda tmp: {"conds": {"y": [0.1, 0.2, 0.3]}}, None),
    ("conds-dict-of-tuple", "conds", TypeError, r"conds\['y'\] is a tuple",
     lambda tmp: {"conds": {"y": (0.1, 0.2, 0.3)}}, None),
    ("conds-dict-nested-short", "conds", ValueError,
     r"conds\['a'\]\['b'\] must have one entry per seed \(3\), got shape \(2,\)",
     lambda tmp: {"conds": {"a": {"b": t(2)}}}, None),
    ("conds-dict-key-not-str", "conds", TypeError, r"conds keys are keyword arguments of the model and must be strings",
     lambda tmp: {"conds": {1: t(N)}}, None),
    ("conds-number", "conds", TypeError, r"conds must be a tensor, a dict of tensors or a sequence, got float",
     lambda tmp: {"conds": 2.0}, None),
    ("conds-string", "conds", TypeError, r"conds must be a tensor, a dict of tensors or a sequence, got str",
     lambda tmp: {"conds": "abc"}, None),
    ("conds-zero-dim-tensor", "conds", ValueError, r"conds must have one entry per seed \(3\), got shape \(\)",
     lambda tmp: {"conds": t()}, None),
    ("conds-meta", "conds", ValueError, r"conds is a meta tensor",
     lambda tmp: {"conds": torch.zeros(N, device="meta")}, None),
    ("conds-items-meta", "conds", ValueError, r"conds\[1\] is a meta tensor",
     lambda tmp: {"conds": [t(2), torch.zeros(2, device="meta"), t(2)]}, None),
    ("unconds-short", "unconds", ValueError, r"unconds has 2 entries but seeds has 3",
     lambda tmp: {"unconds": [t(2), t(2)]}, None),
    # out_dir
    ("out_dir-is-a-file", "out_dir", ValueError, r"out_dir '.*/afile' exists and is not a folder",
     lambda tmp: {"out_dir": _file(tmp / "afile")}, None),
    ("out_dir-under-a-file", "out_dir", ValueError,
     r"out_dir '.*/afile/sub/dir' cannot be created: '.*/afile' is a file, not a folder",
     lambda tmp: {"out_dir": os.path.join(_file(tmp / "afile"), "sub", "dir")}, None),
    ("out_dir-broken-link", "out_dir", ValueError, r"out_dir '.*/link' is a broken symbolic link",
     lambda tmp: {"out_dir": _broken_link(tmp)}, None),
    ("out_dir-not-writable", "out_dir", ValueError, r"out_dir '/proc/self' is not writable",
     lambda tmp: {"out_dir": "/proc/self"}, None),
    ("out_dir-uncreatable", "out_dir", ValueError, r"out_dir '/proc/fastdiff-test/out' cannot be created",
     lambda tmp: {"out_dir": "/proc/fastdiff-test/out"}, None),
    ("out_dir-read-only-folder", "out_dir", ValueError, r"out_dir '.*/ro' is not writable",
     lambda tmp: {"out_dir": _read_only(tmp / "ro")},
     "root writes anywhere" if hasattr(os, "geteuid") and os.geteuid() == 0 else None),
    ("out_dir-in-read-only-folder", "out_dir", ValueError,
     r"out_dir '.*/ro/new' cannot be created: '.*/ro' is not writable",
     lambda tmp: {"out_dir": os.path.join(_read_only(tmp / "ro"), "new")},
     "root writes anywhere" if hasattr(os, "geteuid") and os.geteuid() == 0 else None),
    ("out_dir-int", "out_dir", TypeError, r"out_dir must be a folder path \(str or os.PathLike\), got int 5",
     lambda tmp: {"out_dir": 5}, None),
    ("out_dir-list", "out_dir", TypeError, r"out_dir must be a folder path \(str or os.PathLike\), got list",
     lambda tmp: {"out_dir": ["out"]}, None),
    ("out_dir-bytes", "out_dir", TypeError, r"out_dir must be a folder path \(str or os.PathLike\), got bytes",
     lambda tmp: {"out_dir": os.fsencode(str(tmp / "out"))}, None),
    ("out_dir-empty", "out_dir", ValueError, r"out_dir must be a non-empty folder path",
     lambda tmp: {"out_dir": ""}, None),
    ("out_dir-nul", "out_dir", ValueError, r"out_dir must be a non-empty folder path without NUL",
     lambda tmp: {"out_dir": str(tmp / "o\0ut")}, None),
    # device
    ("device-unknown", "device", ValueError,
     r"device must be a torch.device or a string such as 'cpu' or 'cuda:0', got 'gpu0'",
     lambda tmp: {"device": "gpu0"}, None),
    ("device-cuda-without-cuda", "device", ValueError,
     r"device 'cuda:0' needs CUDA, but torch.cuda.is_available\(\) is False",
     lambda tmp: {"device": "cuda:0"}, None if _cuda_missing() else "CUDA is available"),
    ("device-cuda-object-without-cuda", "device", ValueError, r"device device\(type='cuda'\) needs CUDA",
     lambda tmp: {"device": torch.device("cuda")}, None if _cuda_missing() else "CUDA is available"),
    ("device-cuda-index-out-of-range", "device", ValueError, r"device 'cuda:99' names no CUDA device",
     lambda tmp: {"device": "cuda:99"}, "needs CUDA" if _cuda_missing() else None),
    ("device-meta", "device", ValueError, r"device 'meta' holds no data",
     lambda tmp: {"device": "meta"}, None),
    ("device-int", "device", TypeError, r"device must be a torch.device or a string.*got int 0",
     lambda tmp: {"device": 0}, None),
    ("device-bool", "device", TypeError, r"device must be a torch.device or a string.*got bool True",
     lambda tmp: {"device": True}, None),
    ("device-with-noise-tensor", "device", ValueError, r"device must be a torch.device or a string.*got 'nope'",
     lambda tmp: {"noise": torch.randn(N, 3, 4), "device": "nope"}, None),
    # timeout
    ("timeout-nan", "timeout", ValueError, r"timeout must be a finite number of seconds > 0, got nan",
     lambda tmp: {"timeout": float("nan")}, None),
    ("timeout-inf", "timeout", ValueError, r"timeout must be a finite number of seconds > 0, got inf",
     lambda tmp: {"timeout": float("inf")}, None),
    ("timeout-minus-inf", "timeout", ValueError, r"timeout must be a finite number of seconds > 0, got -inf",
     lambda tmp: {"timeout": float("-inf")}, None),
    ("timeout-zero", "timeout", ValueError, r"timeout must be a number of seconds > 0, got 0",
     lambda tmp: {"timeout": 0}, None),
    ("timeout-negative", "timeout", ValueError, r"timeout must be a number of seconds > 0, got -0.5",
     lambda tmp: {"timeout": -0.5}, None),
    ("timeout-huge", "timeout", ValueError, r"timeout must be at most 1e\+09 seconds, got 1e\+20",
     lambda tmp: {"timeout": 1e20}, None),
    ("timeout-str", "timeout", TypeError, r"timeout must be a number of seconds, got str '5'",
     lambda tmp: {"timeout": "5"}, None),
    ("timeout-bool", "timeout", TypeError, r"timeout must be a number of seconds, got bool True",
     lambda tmp: {"timeout": True}, None),
    ("timeout-none", "timeout", TypeError, r"timeout must be a number of seconds, got NoneType None",
     lambda tmp: {"timeout": None}, None),
    # noise (a shape, or a tensor) and dtype
    ("noise-shape-zero", "noise", ValueError, r"noise shape must be ints >= 1, got \(3, 0\)",
     lambda tmp: {"noise": (3, 0)}, None),
    ("noise-shape-bool", "noise", ValueError, r"noise shape must be ints >= 1, got \(True, 2\)",
     lambda tmp: {"noise": (True, 2)}, None),
    ("noise-shape-false", "noise", ValueError, r"noise shape must be ints >= 1, got \(2, False\)",
     lambda tmp: {"noise": (2, False)}, None),
    ("noise-shape-float", "noise", ValueError, r"noise shape must be ints >= 1, got \(2.0, 3\)",
     lambda tmp: {"noise": (2.0, 3)}, None),
    ("noise-shape-negative", "noise", ValueError, r"noise shape must be ints >= 1, got \(-1,\)",
     lambda tmp: {"noise": (-1,)}, None),
    ("noise-int", "noise", TypeError, r"noise must be the shape of one sample .* got 3",
     lambda tmp: {"noise": 3}, None),
    ("noise-tensor-zero-dim", "noise", ValueError,
     r"noise tensor must be \[N, \.\.\.\] with no zero-sized sample dimension, got shape \(3, 4, 0\)",
     lambda tmp: {"noise": torch.zeros(N, 4, 0)}, None),
    ("noise-tensor-bool", "noise", TypeError, r"noise must have a floating dtype, got torch.bool",
     lambda tmp: {"noise": torch.zeros(N, 4, dtype=torch.bool)}, None),
    ("noise-tensor-int", "noise", TypeError, r"noise must have a floating dtype, got torch.int64",
     lambda tmp: {"noise": torch.zeros(N, 4, dtype=torch.int64)}, None),
    ("noise-tensor-meta", "noise", ValueError, r"noise is a meta tensor",
     lambda tmp: {"noise": torch.zeros(N, 4, device="meta")}, None),
    ("noise-tensor-wrong-n", "noise", ValueError,
     r"noise tensor must be \[N, \.\.\.\] with N = len\(seeds\) = 3, got shape \(2, 4\)",
     lambda tmp: {"noise": torch.randn(2, 4)}, None),
    ("dtype-int", "dtype", TypeError, r"dtype must be a floating torch.dtype \(torch.float32, \.\.\.\), got torch.int32",
     lambda tmp: {"dtype": torch.int32}, None),
    ("dtype-str", "dtype", TypeError, r"dtype must be a floating torch.dtype .*got 'float32'",
     lambda tmp: {"dtype": "float32"}, None),
    # resume
    ("resume-str", "resume", TypeError, r"resume must be True or False, got 'no'",
     lambda tmp: {"resume": "no"}, None),
    ("resume-int", "resume", TypeError, r"resume must be True or False, got 1",
     lambda tmp: {"resume": 1}, None),
]


def _file(path):
    path.write_bytes(b"not a folder")
    return str(path)


def _broken_link(tmp):
    os.symlink(tmp / "nowhere", tmp / "link")
    return str(tmp / "link")


def _read_only(path):
    path.mkdir()
    path.chmod(0o555)
    return str(path)


def _tensors(v, out=None) -> list[torch.Tensor]:
    out = [] if out is None else out
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, dict):
        for x in v.values():
            _tensors(x, out)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _tensors(x, out)
    return out


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in dirs + files}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_named_before_any_work_or_file(tmp_path, case):
    _, arg, exc_type, pattern, overrides, skip = case
    if skip:
        pytest.skip(skip)
    calls = []
    inner = make_model()

    def model(x, t, cond=None):
        calls.append(x.shape[0])
        return inner(x, t, cond)

    box = tmp_path / "box"  # everything the call could create lies under it
    box.mkdir()
    kwargs = {"noise": (3, 4), "seeds": list(SEEDS), "out_dir": str(box / "out"), "conds": T.clone(),
              "timeout": 5.0, "plan": edm_euler_ancestral(2), "backend": "reference"}
    kwargs.update(overrides(box))
    before_tree = _tree(box)
    given = _tensors(kwargs)
    copies = [(x.shape, x.dtype, x.device, None if x.is_meta else x.clone()) for x in given]
    noise = kwargs.pop("noise")

    with pytest.raises(exc_type, match=pattern) as info:
        D.sample(model, noise, **kwargs)

    assert arg in str(info.value), f"{info.value} does not name {arg}"
    assert calls == [], "the model was called before the argument was refused"
    assert _tree(box) == before_tree, f"created: {sorted(_tree(box) - before_tree)}"
    if arg == "out_dir" and isinstance(kwargs["out_dir"], str) and kwargs["out_dir"].startswith("/proc/"):
        assert not os.path.exists(kwargs["out_dir"]) or kwargs["out_dir"] == "/proc/self"
    for x, (shape, dtype, device, data) in zip(given, copies):
        assert (x.shape, x.dtype, x.device) == (shape, dtype, device)
        if data is not None:
            assert torch.equal(x, data), "a caller's tensor changed"


def test_per_sample_entries_of_one_structure_are_accepted_and_stacked(tmp_path):
    # The other side of the checks above: well-formed sequences (tensors; dicts with nested dicts
    # and equal non-tensor values) sample exactly like the equivalent [N, ...] tensors.
    seen = []

    def model(x, t, cond=None, **kw):
        seen.append((cond, kw))
        return make_model()(x, t)

    kw = dict(seeds=SEEDS, plan=edm_euler_ancestral(1), backend="reference", batch_size=2)  # a model call per chunk
    D.sample(model, (3, 4), conds=[T[i].clone() for i in range(N)], **kw)
    assert torch.equal(torch.cat([c for c, _ in seen]), T)
    seen.clear()
    items = [{"y": {"z": T[i].reshape(1)}, "scale": 2} for i in range(N)]
    D.sample(model, (3, 4), conds=items, **kw)
    assert torch.equal(torch.cat([k["y"]["z"] for _, k in seen]), T.reshape(N, 1))
    assert all(k["scale"] == 2 for _, k in seen)
    seen.clear()
    D.sample(model, (3, 4), conds={"y": {"z": T.reshape(N, 1)}, "scale": 2}, **kw)
    assert torch.equal(torch.cat([k["y"]["z"] for _, k in seen]), T.reshape(N, 1))
