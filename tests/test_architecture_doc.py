"""docs/architecture.md's worked example runs as written: a sampler in one function, registered,
equal bit for bit to the built-in it re-derives."""

from __future__ import annotations

import os
import re

from fastdiff import samplers

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "architecture.md")


def test_the_worked_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", open(DOC).read(), re.S)
    assert len(blocks) == 2, "the doc's two python blocks: the sampler and its test"
    try:
        ns: dict = {}
        for code in blocks:
            exec(compile(code, DOC, "exec"), ns)  # noqa: S102 - our own documentation
        assert "my_euler" in samplers.available()
    finally:
        samplers._REGISTRY.pop("my_euler", None)  # other tests iterate over every sampler
