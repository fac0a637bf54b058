# Two commands on a fresh machine: `make serve` runs the sidecar on the embedded default,
# `make test` runs the checks CI runs. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTO := protos/solaris/v1/embedding_store.proto

.PHONY: install serve test lint protos check-protos bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned here, not in pyproject: our machines hold a CPU build of 2.13.0 in their local
# wheel store, and an open range would fetch a newer CUDA build of several GB.
# All three distributions, editable: each a plain path entry (a .pth line), not an import hook,
# so mypy, pyright and IDEs follow the imports; see pyproject.toml.
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet \
		-e ./protos -e ./clients -e '.[dev,replay,train]'

serve: install
	$(BIN)/solaris serve

# The messages' .pyi from protoc itself, the stubs' .pyi from mypy-protobuf's plugin.
GENERATE = $(BIN)/python -m grpc_tools.protoc -I protos --python_out=$(1) --pyi_out=$(1) \
	--grpc_python_out=$(1) --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	--mypy_grpc_out=$(1) $(PROTO)

protos: install
	$(call GENERATE,protos)

# Regenerates into build/ and compares, so CI fails when the bindings lag the .proto.
check-protos: install
	rm -rf build/protos && mkdir -p build/protos
	$(call GENERATE,build/protos)
	for f in build/protos/solaris/v1/*_pb2*; do \
		cmp -s "$$f" "protos/solaris/v1/$$(basename $$f)" || { \
			echo "$$f differs: run 'make protos' and commit the result"; exit 1; }; \
	done

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p solaris.v1 -p solaris.wire -p solaris.clients -p solaris.server -p solaris.app -p solaris.precompute

test: install check-protos lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/batch_get.py
	$(BIN)/python bench/client.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/daemon_intake.py
	$(BIN)/python bench/floor.py
	$(BIN)/python bench/floor_parts.py
	$(BIN)/python bench/l1.py
	$(BIN)/python bench/miss_ladder.py
	$(BIN)/python bench/precompute.py
	$(BIN)/python bench/redis_health.py
	$(BIN)/python bench/redis_l2.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/serve_only.py
	$(BIN)/python bench/sidecar_memory.py
	$(BIN)/python bench/speculator.py
	$(BIN)/python bench/stalled_readers.py
	$(BIN)/python bench/wire.py
