# The two set-up commands of the README. Each creates .venv and installs robustft when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.robustft-installed

.PHONY: quickstart test install

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'  # dev includes the plots extra (matplotlib)
	@touch $(STAMP)

install: $(STAMP)

## Train + per-epoch OOD evaluation on the bundled CIFAR-10 subset, then print the report.
quickstart: $(STAMP)
	$(PY) -m robustft fit --config configs/quickstart.yaml

## The whole test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
