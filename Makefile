# make quickstart — set up and run recipes/quickstart.yaml offline (builds the zoo model on first use)
# make test       — set up and run lint + the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test quality style constraints

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
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
