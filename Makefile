# vitserve: every dependency the tests and the server need is installed from here.
#   make serve   install, build the default model repository if missing, serve on $(HOST):$(PORT)
#   make test    install, run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MLSERVER_VENV ?= .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
REPOSITORY ?= model_repository
REPOSITORY_STAMP := $(REPOSITORY)/.default-complete
HOST ?= 127.0.0.1
PORT ?= 8000
# The default repository: a global-attention ViT for small inputs, a windowed Swin for large ones.
GLOBAL_MODEL ?= vit_tiny_patch16_224
GLOBAL_BUCKETS ?= 224,384
WINDOWED_MODEL ?= swin_tiny_patch4_window7_224
WINDOWED_BUCKETS ?= 448,672,896,1344
PYTEST_ARGS ?=

.PHONY: install test lint serve export bench clean mlserver-env tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# MLServer pins an older FastAPI, so the independent KServe v2 server used by the tests lives in its own venv.
$(MLSERVER_STAMP):
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet --upgrade pip
	$(MLSERVER_VENV)/bin/pip install --quiet mlserver==1.7.1 'onnxruntime>=1.22,<2' 'numpy>=2,<3'
	touch $(MLSERVER_STAMP)

mlserver-env: $(MLSERVER_STAMP)

# Debian's prometheus package: promtool checks the deploy rules, prometheus runs in the local cluster
# test (tests/test_cluster.py); kubectl with kustomize ships with the machine image.
tools:
	@{ command -v promtool && command -v prometheus; } >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v kubectl >/dev/null || { echo "kubectl (with kustomize) is required: install the kubectl package" >&2; exit 1; }

$(REPOSITORY_STAMP): | $(STAMP)
	$(BIN)/vitserve export --model $(GLOBAL_MODEL) --name vit_global --buckets $(GLOBAL_BUCKETS) --repository $(REPOSITORY)
	$(BIN)/vitserve export --model $(WINDOWED_MODEL) --name swin_windowed --buckets $(WINDOWED_BUCKETS) --repository $(REPOSITORY)
	touch $(REPOSITORY_STAMP)

export: $(REPOSITORY_STAMP)

serve: $(STAMP) $(REPOSITORY_STAMP)
	$(BIN)/vitserve serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT)

test: $(STAMP) $(MLSERVER_STAMP) tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python -m bench.runtimes
	$(BIN)/python -m bench.attention
	@command -v hey >/dev/null || { apt-get update -qq && apt-get install -y -qq hey; }
	$(BIN)/python -m bench.serving

lint: $(STAMP)
	$(BIN)/ruff check models export service tests bench
	$(BIN)/ruff format --check models export service tests bench

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) $(REPOSITORY) .pytest_cache
