# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch 2.14.1 / torchvision 0.29.1 are the tested releases (installed without a large download here).
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv install install-test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q $(TORCH) -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m visionformers.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests -p no:cacheprovider

bench: $(VENV)/.installed-test  # side-by-side timings against the references (figures: bench/RESULTS.md)
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_vision.py
	$(PY) bench/bench_unet.py
	$(PY) bench/bench_linear.py
	$(PY) bench/bench_text.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
