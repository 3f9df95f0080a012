# Cockatoo pipelines. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
REGISTRY ?= localhost:5000/cockatoo
TAG ?= dev

.PHONY: install lock demo test test-fast test-gpu test-images mutate lint bench bench-gpu bench-images format golden compile images \
	push-images base-by-digest container-engine clean

install: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml; on these machines pip takes its CPU build from
# local disk. The virtualenv is rebuilt when the pinned dependencies change.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev]"
	@command -v cc >/dev/null 2>&1 || echo "warning: no C compiler (cc): torch.compile's inductor needs one, and \
	tests/test_compiled_step.py fails without it; on Debian or Ubuntu: apt-get install gcc" >&2
	touch $@

# requirements.lock: every package at one version, pip's resolution of pyproject.toml's pins (with
# the demo and dev extras) on this platform. Run after changing a pin; `make install`, CI and both
# images install with it as constraints.
lock: install
	mkdir -p build
	$(PY) -m pip install --quiet --dry-run --ignore-installed --report build/lock-report.json ".[demo,dev]"
	$(PY) -m cockatoo_lib.versions --write-lock build/lock-report.json requirements.lock

# The whole loop: a pipeline run (its gate registers the model and promotes it or not), then
# predictions from the champion of the run's embedded registry, or, when the gate has promoted
# nothing (on the sample the linear baseline wins), from the run's model, said so.
demo: install
	rm -f runs/demo-predictions.csv
	$(BIN)/cockatoo run --model-type minilm --data-config sample --output-root runs \
		--predict cockatoo_lib/presets/sample/new_texts.csv --predictions runs/demo-predictions.csv

# Three workers on 2 cores (one fills the time another waits on a server or a timeout), each
# test module on one worker (--dist loadscope: its module fixtures are built once), in random
# order (the seed is printed; `pytest --randomly-seed=N` repeats an order, the pipeline run
# first: tests/conftest.py), branch coverage printed and held above the floor in pyproject.toml.
# Under 5 minutes on 2 cores (docs/testing.md).
test: lint
	$(PY) -m pytest -q -n 3 --dist loadscope --cov --cov-report=term -m "not images" --durations=15

# The inner loop: everything but the tests marked slow (training, pipelines, servers) and images,
# on both cores, without coverage.
test-fast: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not images" -p no:randomly

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
	$(BIN)/hadolint images/Dockerfile

# Benchmarks (B1-B3, B5-B9, B11 on this machine): writes docs/benchmarks.md. `make bench ONLY=b7`
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

# Both images (images/Dockerfile): $(REGISTRY)/cockatoo-cpu:$(TAG) and .../cockatoo-cuda:$(TAG).
# TORCH_INDEX_URL: where the CPU image takes torch's CPU build (a mirror; the Dockerfile's default
# is the PyTorch CPU index); TORCH_CUDA_INDEX_URL the same for the CUDA build (default PyPI);
# DOCKER_BUILD_FLAGS go to both builds (e.g. --network=host).
CPU_IMAGE := $(REGISTRY)/cockatoo-cpu:$(TAG)
CUDA_IMAGE := $(REGISTRY)/cockatoo-cuda:$(TAG)
# Both builds get both index arguments: Docker's legacy builder (no BuildKit) builds every stage
# above the target, so the cuda build passes through the (then cached) cpu stage.
INDEX_ARGS = $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) \
	$(if $(TORCH_CUDA_INDEX_URL),--build-arg TORCH_CUDA_INDEX_URL=$(TORCH_CUDA_INDEX_URL))
# PYTHON_IMAGE: the base of both (the Dockerfile's default is the tag python:3.11-slim-bookworm).
# Images that are pushed name it by digest, so that a rebuild starts from the same bytes.
BASE_ARG = $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE))
images: container-engine
	docker build $(DOCKER_BUILD_FLAGS) $(INDEX_ARGS) $(BASE_ARG) -f images/Dockerfile --target cpu -t $(CPU_IMAGE) .
	docker build $(DOCKER_BUILD_FLAGS) $(INDEX_ARGS) $(BASE_ARG) -f images/Dockerfile --target cuda -t $(CUDA_IMAGE) .
	@docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F -e '$(CPU_IMAGE) ' -e '$(CUDA_IMAGE) '

push-images: base-by-digest images
	docker push $(CPU_IMAGE)
	docker push $(CUDA_IMAGE)

# Builds both images, then runs the compiled pipeline with kfp.local's DockerRunner, every step in
# its own container of the CPU image, and checks both images as a random uid. Not in `make test`.
test-images: install images
	COCKATOO_CPU_IMAGE=$(CPU_IMAGE) COCKATOO_CUDA_IMAGE=$(CUDA_IMAGE) \
		$(PY) -m pytest -q -p no:randomly -m images tests/test_images_run.py

# B10 (bench/container_images.py): both images' sizes and what fills them, into docs/benchmarks.md.
bench-images: install images
	$(PY) -m bench.container_images --cpu $(CPU_IMAGE) --cuda $(CUDA_IMAGE)

base-by-digest:
	@case "$(PYTHON_IMAGE)" in *@sha256:*) ;; *) echo "push-images: name the base by digest, e.g. \
	PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> (docker buildx imagetools inspect \
	python:3.11-slim-bookworm prints it); got '$(PYTHON_IMAGE)'" >&2; exit 1;; esac

container-engine:
	@docker info >/dev/null 2>&1 || { echo "no container engine answers (docker info failed): start dockerd, or point DOCKER_HOST at one" >&2; exit 1; }

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build runs .pytest_cache .ruff_cache
