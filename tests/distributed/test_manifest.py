"""The resume manifest (:mod:`fastdiff.distributed.manifest`): equal settings describe equally, every changed
setting is named, and a folder of samples is never mixed with another run's."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fastdiff.distributed import manifest
from fastdiff.core import schedules
from fastdiff.distributed.manifest import ManifestError


_MODEL = torch.nn.Linear(3, 3)


def _doc(**over):
    kw = dict(seeds=[1, 2, 3], shape=(2, 3), dtype=torch.float32, device=torch.device("cpu"), noise=None,
              model=_MODEL, model_id=None, conds=None, unconds=None,
              settings={"sampler": "dpmpp_2m", "steps": 10, "schedule": schedules.vp("linear")}, run=None)
    kw.update(over)
    return manifest.build(**kw)


def test_equal_settings_describe_equally_and_read_back_unchanged():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3)
    a = _doc(model=m, conds=torch.arange(3.0), settings={"schedule": schedules.vp("scaled_linear"), "eta": 0.5})
    b = _doc(model=m, conds=torch.arange(3.0), settings={"schedule": schedules.vp("scaled_linear"), "eta": 0.5})
    assert a == b
    assert json.loads(json.dumps(a)) == a  # what is written is what is compared


@pytest.mark.parametrize("field,change,path", [
    ("seeds", [1, 2, 4], "samples.seeds_sha256"),
    ("shape", (2, 4), "samples.shape"),
    ("dtype", torch.float64, "samples.dtype"),
    ("noise", torch.ones(3, 2, 3), "samples.noise"),
    ("conds", torch.tensor([0, 1, 3]), "conds"),
    ("unconds", {"y": torch.zeros(3)}, "unconds"),
    ("model_id", "my model v2", "model.model_id"),
    ("settings", {"sampler": "ddim", "steps": 10, "schedule": schedules.vp("linear")}, "settings.sampler"),
    ("settings", {"sampler": "dpmpp_2m", "steps": 11, "schedule": schedules.vp("linear")}, "settings.steps"),
    ("settings", {"sampler": "dpmpp_2m", "steps": 10, "schedule": schedules.vp("scaled_linear")},
     "settings.schedule.betas"),
    ("settings", {"sampler": "dpmpp_2m", "steps": 10, "schedule": schedules.vp("linear"), "eta": 1.0},
     "settings.eta"),
    ("run", {"steps": 7}, "run.steps"),
])
def test_every_changed_setting_is_named(field, change, path):
    base = _doc()
    diffs = manifest.differences(base, _doc(**{field: change}))
    assert diffs and any(p.startswith(path) for p, _, _ in diffs), diffs


def test_model_identity_is_its_weights_and_model_id_overrides_it():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3)
    before = manifest.model_identity(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert manifest.model_identity(m) != before
    assert manifest.model_identity(m, "sd15 ema") == {"model_id": "sd15 ema"}
    for bad in ("", 5, b"x"):
        with pytest.raises(TypeError, match="model_id"):
            manifest.model_identity(m, bad)


def test_a_function_is_identified_by_name_and_what_it_closes_over():
    def make(w):
        def f(x, t):
            return x * w
        return f

    assert manifest.describe(make(torch.ones(2))) == manifest.describe(make(torch.ones(2)))
    assert manifest.describe(make(torch.ones(2))) != manifest.describe(make(torch.zeros(2)))
    assert manifest.describe(make(2.0)) != manifest.describe(make(3.0))


def test_values_that_json_would_mangle_are_described_exactly():
    assert manifest.describe(float("nan")) == manifest.describe(float("nan"))  # NaN compares equal as text
    assert manifest.describe(0.1) != manifest.describe(0.1 + 2**-56)
    assert manifest.describe(torch.tensor(1.5, dtype=torch.bfloat16))["dtype"] == "torch.bfloat16"
    x = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    assert manifest.describe(x.t()) == manifest.describe(x.t().contiguous())  # content, not layout
    assert manifest.describe(np.arange(3))["sha256"] != manifest.describe(np.arange(3) + 1)["sha256"]
    long = manifest.describe(list(range(1000)))
    assert long["sequence"] == 1000 and manifest.describe(list(range(1, 1001)))["sha256"] != long["sha256"]


def _touch_sample(d, i=0):
    open(os.path.join(d, f"{i:06d}-seed{i}.pt"), "wb").close()


def test_check_writes_then_accepts_the_same_run_and_refuses_another(tmp_path):
    d = str(tmp_path)
    manifest.check(d, _doc(), write=True)
    assert json.load(open(os.path.join(d, manifest.FILE))) == _doc()
    _touch_sample(d)
    manifest.check(d, _doc(), write=True)  # the same run resumes
    with pytest.raises(ManifestError, match=r"settings\.steps was 10, now 11") as e:
        manifest.check(d, _doc(settings={"sampler": "dpmpp_2m", "steps": 11, "schedule": schedules.vp("linear")}),
                       write=False)
    assert [p for p, _, _ in e.value.differences] == ["settings.steps"]


def test_a_folder_without_samples_takes_the_new_manifest(tmp_path):
    d = str(tmp_path)
    manifest.check(d, _doc(), write=True)
    new = _doc(run={"steps": 3})
    manifest.check(d, new, write=True)  # a failed first run left only its manifest: nothing can mix
    assert json.load(open(os.path.join(d, manifest.FILE))) == new


def test_samples_without_a_readable_current_manifest_are_refused(tmp_path):
    d = str(tmp_path)
    _touch_sample(d)
    with pytest.raises(ManifestError, match="no manifest"):
        manifest.check(d, _doc(), write=True)
    assert not os.path.exists(os.path.join(d, manifest.FILE))  # nothing written on refusal
    with open(os.path.join(d, manifest.FILE), "w") as f:
        f.write('{"model": "gmm", "steps": 6')  # truncated
    with pytest.raises(ManifestError, match="cannot be read"):
        manifest.check(d, _doc(), write=True)
    with open(os.path.join(d, manifest.FILE), "w") as f:
        json.dump({"model": "gmm", "steps": 6}, f)  # the command line's old flat record
    with pytest.raises(ManifestError, match="older fastdiff manifest"):
        manifest.check(d, _doc(), write=True)


def test_another_fastdiff_version_resumes_unless_the_numerics_changed(tmp_path, monkeypatch):
    d = str(tmp_path)
    old = _doc()
    old["fastdiff"]["version"] = "0.0.1"
    with open(os.path.join(d, manifest.FILE), "w") as f:
        json.dump(old, f)
    _touch_sample(d)
    manifest.check(d, _doc(), write=False)
    old["fastdiff"]["numerics"] = manifest.NUMERICS - 1
    with open(os.path.join(d, manifest.FILE), "w") as f:
        json.dump(old, f)
    with pytest.raises(ManifestError, match="fastdiff.numerics"):
        manifest.check(d, _doc(), write=False)
