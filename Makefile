# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-smoke schema test-arm64 dist clean

# setuptools announces every editable install made through an import finder (as this one, where
# converters/ installs as moub_converters); that notice is information only, so it is filtered.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -e '.[convert,dev,torch,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moub demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-smoke: $(STAMP)
	$(PY) -m benchmarks.run --smoke

# Regenerate the committed FlatBuffers bindings from schema/moub.fbs.
schema: $(STAMP)
	$(PY) tools/generate_schema.py

# The wheel, in dist/: its base install is the device runtime (the converter's dependencies are
# the [convert] extra). Built from a copy of the tracked files, so the checkout gets no build/ or
# *.egg-info folder.
DIST ?= dist
dist: $(STAMP)
	rm -rf $(DIST)
	tmp=$$(mktemp -d) && git ls-files -z | xargs -0 cp --parents -t "$$tmp" && \
	$(PY) -m pip wheel -q --no-deps -w $(DIST) "$$tmp"; status=$$?; rm -rf "$$tmp"; exit $$status

-include arm64.mk

clean:
	rm -rf $(VENV) build dist *.egg-info
