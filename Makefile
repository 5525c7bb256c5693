# The two commands: `make demo` (set up, then run recipes/demo.yaml) and `make test`.
# `make mutations`: the privacy mutation check (CI runs it after `make test`).
# `make docs`: the documentation site (MkDocs, strict: a broken link fails).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synthfactory-installed

.PHONY: install demo test mutations lint docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/synthfactory run recipes/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

mutations: $(STAMP)
	$(BIN)/python tests/privacy_mutations.py

lint: $(STAMP)
	$(BIN)/ruff check synthfactory tests
	$(BIN)/ruff format --check synthfactory tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf runs site .pytest_cache
