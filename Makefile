# kdcache developer entry points. A fresh machine needs only Python 3.11: `make test` builds .venv.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup lint test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: setup
	$(BIN)/kdcache demo

bench: setup
	$(BIN)/python benchmarks/teach.py --out benchmarks/teach.json
	$(BIN)/python benchmarks/record_path.py --out benchmarks/record_path.json
	$(BIN)/python benchmarks/train.py --out benchmarks/train.json
	$(BIN)/python benchmarks/fidelity.py --out benchmarks/fidelity.json
	$(BIN)/python benchmarks/scaling.py --out benchmarks/scaling.json
	$(BIN)/python benchmarks/loader.py --out benchmarks/loader.json
	$(BIN)/python benchmarks/imagenet_scale.py --out benchmarks/imagenet_scale.json
	$(BIN)/python benchmarks/views.py --out benchmarks/views.json
	$(BIN)/python benchmarks/linked_and_mixed.py --out benchmarks/linked_and_mixed.json

clean:
	rm -rf $(VENV) build *.egg-info
