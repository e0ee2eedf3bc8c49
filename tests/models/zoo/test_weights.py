"""fastdiff.models.zoo.digits weights: every committed file is recorded with its SHA-256, and every hostile
copy (corrupt bytes, truncated at several lengths, a missing file, bad JSON, missing or wrong keys,
a wrong digest, weights that do not fit the architecture) is refused by one
:class:`fastdiff.models.zoo.WeightsError` naming the file and how to restore or retrain it, without
writing anything. The CLI prints that as one line and exits 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch

from fastdiff.cli import main as cli_main
from fastdiff.models.zoo import WeightsError
from fastdiff.models.zoo import digits as D

NAMES = ("denoiser", "noisy_classifier", "feature_classifier")
LOADERS = {"denoiser": D.load_denoiser, "noisy_classifier": D.load_noisy_classifier,
           "feature_classifier": D.load_feature_classifier}


def _snapshot(d: str) -> dict:
    """Every file under ``d`` with its bytes and modification time (to prove nothing was written)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture
def wdir(tmp_path) -> str:
    """A private copy of the committed weights folder."""
    d = str(tmp_path / "weights")
    shutil.copytree(D.WEIGHTS_DIR, d)
    return d


def _paths(d: str, name: str) -> tuple[str, str]:
    return os.path.join(d, f"{name}.json"), os.path.join(d, f"{name}.safetensors")


def _edit_json(d: str, name: str, fn) -> None:
    path = _paths(d, name)[0]
    with open(path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _write_weights(d: str, name: str, data: bytes, record: bool) -> None:
    """Replace the weights bytes; ``record``: also record their digest (the JSON then agrees)."""
    with open(_paths(d, name)[1], "wb") as f:
        f.write(data)
    if record:
        _edit_json(d, name, lambda c: c.__setitem__("sha256", hashlib.sha256(data).hexdigest()))


def _weights(d: str, name: str) -> bytes:
    with open(_paths(d, name)[1], "rb") as f:
        return f.read()


def _flip(offset_of):
    def mutate(d, name):
        data = bytearray(_weights(d, name))
        data[offset_of(len(data))] ^= 0xFF
        _write_weights(d, name, bytes(data), record=False)
    return mutate


def _truncate(length_of, record=False):
    def mutate(d, name):
        data = _weights(d, name)
        _write_weights(d, name, data[:length_of(len(data))], record=record)
    return mutate


def _remove(which):
    def mutate(d, name):
        os.remove(_paths(d, name)[which])
    return mutate


def _raw_json(text: bytes):
    def mutate(d, name):
        with open(_paths(d, name)[0], "wb") as f:
            f.write(text)
    return mutate


def _json(fn):
    return lambda d, name: _edit_json(d, name, fn)


def _other_weights(d, name):
    """Another model's (valid) weights, with their digest recorded: they do not fit this architecture."""
    other = {"denoiser": "noisy_classifier"}.get(name, "denoiser")
    _write_weights(d, name, _weights(d, other), record=True)


def _nan_weights(d, name):
    from safetensors.torch import load, save

    state = load(_weights(d, name))
    k = sorted(state)[0]
    state[k] = torch.full_like(state[k], float("nan"))
    _write_weights(d, name, save(state), record=True)


def _arch_changed(d, name):
    key = "c1" if name == "feature_classifier" else "width"
    _edit_json(d, name, lambda c: c["arch"].__setitem__(key, c["arch"][key] + 8))


def _del(key):
    return _json(lambda c: c.pop(key))


# (id, mutation(dir, name), which file the error must name: 0 = json, 1 = safetensors, message part)
HOSTILE = [
    ("flip-byte-data", _flip(lambda n: n // 2), 1, "SHA-256"),
    ("flip-byte-header", _flip(lambda n: 12), 1, "SHA-256"),
    ("flip-last-byte", _flip(lambda n: n - 1), 1, "SHA-256"),
    ("truncated-0", _truncate(lambda n: 0), 1, "SHA-256"),
    ("truncated-7", _truncate(lambda n: 7), 1, "SHA-256"),
    ("truncated-100", _truncate(lambda n: 100), 1, "SHA-256"),
    ("truncated-half", _truncate(lambda n: n // 2), 1, "SHA-256"),
    ("truncated-minus-1", _truncate(lambda n: n - 1), 1, "SHA-256"),
    # the digest recorded for the damaged bytes: safetensors' own parser refuses them (SafetensorError)
    ("truncated-7-recorded", _truncate(lambda n: 7, record=True), 1, "not a readable safetensors file"),
    ("truncated-half-recorded", _truncate(lambda n: n // 2, record=True), 1, "not a readable safetensors file"),
    ("truncated-minus-1-recorded", _truncate(lambda n: n - 1, record=True), 1, "not a readable safetensors file"),
    ("missing-weights", _remove(1), 1, "weights file is missing"),
    ("missing-json", _remove(0), 0, "config file is missing"),
    ("json-garbage", _raw_json(b'{"arch": '), 0, "not valid JSON"),
    ("json-empty", _raw_json(b""), 0, "not valid JSON"),
    ("json-not-utf8", _raw_json(b"\xff\xfe{}"), 0, "not valid JSON"),
    ("json-a-list", _raw_json(b"[1, 2]"), 0, "JSON object"),
    ("json-no-sha256", _del("sha256"), 0, "'sha256'"),
    ("json-no-arch", _del("arch"), 0, "'arch'"),
    ("json-no-class", _del("class"), 0, "'class'"),
    ("json-other-class", _json(lambda c: c.__setitem__("class", "Nope")), 0, "records class"),
    ("json-arch-not-object", _json(lambda c: c.__setitem__("arch", [1, 2])), 0, "'arch'"),
    ("json-arch-extra-key", _json(lambda c: c["arch"].__setitem__("depth", 3)), 0, "'arch'"),
    ("json-arch-missing-key", _json(lambda c: c["arch"].pop(sorted(c["arch"])[0])), 0, "'arch'"),
    ("json-arch-string", _json(lambda c: c["arch"].__setitem__(sorted(c["arch"])[0], "64")), 0, "'arch' values"),
    ("json-arch-huge", _json(lambda c: c["arch"].__setitem__(sorted(c["arch"])[0], 10**9)), 0, "'arch' values"),
    ("json-sha-malformed", _json(lambda c: c.__setitem__("sha256", "abc")), 0, "'sha256'"),
    ("json-sha-wrong", _json(lambda c: c.__setitem__("sha256", "0" * 64)), 1, "SHA-256"),
    ("arch-does-not-fit", _arch_changed, 1, "do not fit the architecture"),
    ("other-model-weights", _other_weights, 1, "do not fit the architecture"),
    ("non-finite-weights", _nan_weights, 1, "not finite"),
]


def _check_refusal(exc: WeightsError, d: str, name: str, which: int, part: str) -> None:
    path = _paths(d, name)[which]
    msg = str(exc)
    assert isinstance(exc, ValueError)
    assert exc.path == path and path in msg, msg
    assert part in msg, msg
    assert "\n" not in msg, msg
    assert f"python scripts/train_digits.py --only {name} --out {os.path.abspath(d)}" in msg, msg


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case, mutate, which, part", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_weights_are_refused_by_name(wdir, name, case, mutate, which, part):
    mutate(wdir, name)
    before = _snapshot(os.path.dirname(wdir))
    with pytest.raises(WeightsError) as info:
        LOADERS[name](wdir)
    _check_refusal(info.value, wdir, name, which, part)
    if part not in ("do not fit the architecture", "not finite", "not a readable safetensors file"):
        # the digest check comes first: weights_sha256 refuses exactly what the loader does
        with pytest.raises(WeightsError) as info2:
            D.weights_sha256(name, wdir)
        assert str(info2.value) == str(info.value)
    assert _snapshot(os.path.dirname(wdir)) == before  # nothing written, nothing removed


@pytest.mark.parametrize("name", NAMES)
def test_committed_weights_carry_their_sha256(name):
    with open(_paths(D.WEIGHTS_DIR, name)[1], "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert D.read_config(name)["sha256"] == digest
    assert D.weights_sha256(name) == digest
    assert D.weights_sha256(name, D.WEIGHTS_DIR) == digest


def test_the_package_folder_says_how_to_restore_with_git(wdir, monkeypatch):
    """The committed folder's message names the ``git checkout`` that restores it and the script that
    retrains it (the copy stands in for the package folder, which tests never touch)."""
    monkeypatch.setattr(D, "_PACKAGE_WEIGHTS", os.path.abspath(wdir))
    monkeypatch.setattr(D, "WEIGHTS_DIR", wdir)
    _flip(lambda n: n // 3)(wdir, "noisy_classifier")
    with pytest.raises(WeightsError) as info:
        D.load_noisy_classifier()
    msg = str(info.value)
    assert ("git checkout -- fastdiff/zoo/weights/noisy_classifier.safetensors "
            "fastdiff/zoo/weights/noisy_classifier.json") in msg, msg
    assert "python scripts/train_digits.py --only noisy_classifier`" in msg, msg


def test_save_records_the_digest_and_load_verifies_it(tmp_path):
    model = D.FeatureClassifier(c1=4, c2=8, feat=16)
    path = D.save(model, "feature_classifier", {"params": 0}, str(tmp_path))
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert D.read_config("feature_classifier", str(tmp_path))["sha256"] == digest
    assert D.weights_sha256("feature_classifier", str(tmp_path)) == digest
    D.load_feature_classifier(str(tmp_path))
    _flip(lambda n: n - 5)(str(tmp_path), "feature_classifier")
    with pytest.raises(WeightsError, match="SHA-256"):
        D.load_feature_classifier(str(tmp_path))


def test_schedule_config_refuses_a_missing_or_scheduleless_json(wdir):
    assert D.schedule_config(wdir)["num_train_timesteps"] == 1000
    _edit_json(wdir, "denoiser", lambda c: c.pop("schedule"))
    with pytest.raises(WeightsError, match="no 'schedule' object") as info:
        D.schedule_config(wdir)
    assert info.value.path == _paths(wdir, "denoiser")[0]
    os.remove(_paths(wdir, "denoiser")[0])
    with pytest.raises(WeightsError, match="config file is missing"):
        D.schedule_config(wdir)


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="name must be one of"):
        D.weights_sha256("vae")


def test_weights_error_pickles():
    exc = WeightsError("/x/denoiser.safetensors", "is broken", "retrain it")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is WeightsError and str(back) == str(exc) and back.path == exc.path


CLI_CASES = [h for h in HOSTILE if h[0] in ("flip-byte-data", "truncated-100", "truncated-half-recorded",
                                             "missing-weights", "missing-json", "json-garbage", "json-no-sha256",
                                             "other-model-weights")]


@pytest.mark.parametrize("case, mutate, which, part", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_prints_one_line_naming_the_file(wdir, tmp_path, monkeypatch, capsys, case, mutate, which, part):
    """``fastdiff sample --model digits`` against a damaged weights folder: exit 2, one line on
    stderr naming the file, no traceback, no --out folder."""
    mutate(wdir, "denoiser")
    monkeypatch.setattr(D, "WEIGHTS_DIR", wdir)
    out = str(tmp_path / "samples")
    before = _snapshot(wdir)
    rc = cli_main(["sample", "--model", "digits", "--out", out, "-n", "2", "--steps", "2", "--backend", "reference"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdiff sample: error: "), err
    assert _paths(wdir, "denoiser")[which] in lines[0] and part in lines[0], err
    assert "Traceback" not in err
    assert not os.path.exists(out)
    assert _snapshot(wdir) == before
