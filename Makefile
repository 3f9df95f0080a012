# Cockatoo pipelines. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
REGISTRY ?= localhost:5000/cockatoo
TAG ?= dev

.PHONY: install demo test test-gpu mutate lint bench bench-gpu format golden compile images clean

install: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml; on these machines pip takes its CPU build from
# local disk. The virtualenv is rebuilt when the pinned dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The whole loop: a pipeline run (its gate registers the model and promotes it or not), then
# predictions from the champion of the run's embedded registry, or, when the gate has promoted
# nothing (on the sample the linear baseline wins), from the run's model, said so.
demo: install
	rm -f runs/demo-predictions.csv
	$(BIN)/cockatoo run --model-type minilm --data-config sample --output-root runs \
		--predict cockatoo_lib/presets/sample/new_texts.csv --predictions runs/demo-predictions.csv

# Both cores, tests in random order (the seed is printed; `pytest --randomly-seed=N` repeats an
# order), branch coverage printed and held above the floor in pyproject.toml.
test: lint
	$(PY) -m pytest -q -n 2 --dist worksteal --cov --cov-report=term

# Tests marked `gpu` (skipped where there is no CUDA); docs/gpu.md says how to run them on an
# offline GPU machine.
test-gpu: install
	$(PY) -m pytest -q -m gpu -p no:randomly

# Mutation testing of the numeric core (metrics, losses, optim); figures in docs/testing.md.
mutate: install
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint images/cpu/Dockerfile images/cuda/Dockerfile

# Benchmarks (B1-B3, B5-B7 on this machine): writes docs/benchmarks.md. `make bench ONLY=b7`
# runs some of them and keeps the other sections' recorded figures.
bench: install
	$(PY) -m bench.harness $(if $(ONLY),--only $(ONLY))

# B4 on a CUDA machine: writes the B4 section of docs/benchmarks.md (one line and nothing
# written elsewhere).
bench-gpu: install
	$(PY) -m bench.gpu

# Regenerate the compiled pipeline the golden-file test compares against.
golden: install
	$(BIN)/cockatoo compile --output tests/golden/cockatoo-train.yaml

compile: install
	$(BIN)/cockatoo compile --output build/cockatoo-train.yaml --image-registry $(REGISTRY) --image-tag $(TAG)

# Build and push both images (needs a Docker engine), then compile against them.
images:
	docker build -f images/cpu/Dockerfile -t $(REGISTRY)/cockatoo-cpu:$(TAG) .
	docker build -f images/cuda/Dockerfile -t $(REGISTRY)/cockatoo-cuda:$(TAG) .
	docker push $(REGISTRY)/cockatoo-cpu:$(TAG)
	docker push $(REGISTRY)/cockatoo-cuda:$(TAG)

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build runs .pytest_cache .ruff_cache
