# The README's two set-up commands: `make run` (main job) and `make test` (whole test suite).
# Both create .venv on first use. torch is pinned to the CPU release that lies on the machine's disk;
# an unpinned torch would pull a several-GB CUDA build. k-diffusion is a test-only dependency
# installed without its training-stack dependencies (torchvision, wandb, ...), which would replace torch.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: run test asan clean-venv

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

# `make asan`: the op and kernel tests against fastdiff._C built with AddressSanitizer and UBSan
# (setup.py's FASTDIFF_SANITIZE=1: -fsanitize=address,undefined -fno-omit-frame-pointer -g1, at -O1).
# The extension is built out of place, into $(ASAN_DIR)/lib (the in-place build stays as it is), and
# the tests run from a copy of the package and tests in $(ASAN_DIR)/tree holding that build; the
# runner prints fastdiff._C.__file__ and refuses any other build. python is not instrumented, so
# the ASan runtime is preloaded, and libstdc++ with it: preloaded alone, ASan looks for
# __cxa_throw before anything has loaded libstdc++ and aborts on the extension's first C++
# exception ("CHECK failed ... real___cxa_throw"). detect_leaks=0: CPython and torch keep memory
# until exit by design. Reports go to $(ASAN_DIR)/reports (pytest's capture would swallow them),
# are printed, and any report fails the target.
ASAN_DIR ?= build/asan
ASAN_TESTS ?= tests/backends/test_cpu.py tests/runtime/test_contract.py tests/runtime/test_executor.py tests/runtime/test_op_errors.py \
	tests/guiders/test_diffusers_guiders.py
ASAN_REPORTS = $(abspath $(ASAN_DIR))/reports
ASAN_RUN = 'import os, sys, pytest, fastdiff._C as C; print("fastdiff._C:", C.__file__, flush=True); \
	sys.exit(pytest.main(sys.argv[1:]) if C.__file__.startswith(os.getcwd() + os.sep) else "not the ASan build")'

asan: $(VENV)/.installed
	FASTDIFF_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(ASAN_DIR)/lib --build-temp $(ASAN_DIR)/temp
	rm -rf $(ASAN_DIR)/tree $(ASAN_REPORTS)
	mkdir -p $(ASAN_DIR)/tree $(ASAN_REPORTS)
	cp -r fastdiff tests csrc pyproject.toml $(ASAN_DIR)/tree/
	cp -r kernels $(ASAN_DIR)/tree/fastdiff/kernels
	find $(ASAN_DIR)/tree \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	cp $(ASAN_DIR)/lib/fastdiff/_C*.so $(ASAN_DIR)/tree/fastdiff/
	cd $(ASAN_DIR)/tree && PYTHONPATH=$$PWD \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$(ASAN_REPORTS)/asan \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(ASAN_REPORTS)/ubsan \
		$(abspath $(PY)) -c $(ASAN_RUN) -q -p no:cacheprovider -W ignore $(ASAN_TESTS); \
	status=$$?; cat $(ASAN_REPORTS)/* 2>/dev/null; test $$status = 0 && test -z "$$(ls $(ASAN_REPORTS))"

clean-venv:
	rm -rf $(VENV)
