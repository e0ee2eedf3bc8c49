# The README's two set-up commands: `make run` (main job) and `make test` (whole test suite).
# Both create .venv on first use. torch is pinned to the CPU release that lies on the machine's disk;
# an unpinned torch would pull a several-GB CUDA build. k-diffusion is a test-only dependency
# installed without its training-stack dependencies (torchvision, wandb, ...), which would replace torch.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: run test clean-venv

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,bench]'
	$(PIP) --no-deps k-diffusion==0.1.1.post1
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/fastdiff bench

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
