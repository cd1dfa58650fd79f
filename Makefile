# vitserve: every dependency the tests and the server need is installed from here.
#   make serve   install what serving needs, export the first bucket of each backbone if missing, serve it
#                (VITSERVE_HOST:VITSERVE_PORT) while the other buckets export in the background and load as they land
#   make export  the whole default model repository
#   make test    install with the test extras, run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# The checkout's own code, whichever checkout the virtualenv's editable install points at.
VITSERVE := $(BIN)/python -m service.cli
MLSERVER_VENV ?= .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
# The repository `make export` builds and `make serve` serves: REPOSITORY=..., else VITSERVE_REPOSITORY.
REPOSITORY ?= $(or $(VITSERVE_REPOSITORY),model_repository)
REPOSITORY_STAMP := $(REPOSITORY)/.default-complete
FIRST_STAMP := $(REPOSITORY)/.first-buckets-complete
# Every other setting reaches vitserve as its VITSERVE_* variable (environment or `make serve VITSERVE_X=...`,
# which make exports to the recipe). HOST, PORT and POLL_S become flags only when given on make's command
# line, so a default here never overrides the environment.
cli_flag = $(if $(filter command line,$(origin $(1))),--$(2) $($(1)))
SERVE_FLAGS = $(call cli_flag,HOST,host) $(call cli_flag,PORT,port) $(call cli_flag,POLL_S,poll-s)
# The default repository: a global-attention ViT for small inputs, a windowed Swin for large ones.
# ViT-S/16 and Swin-T are matched at 224 (ImageNet top-1 79.9 / 81.2%, 4.6 / 4.5 GFLOPs, per their
# papers), so the crossover the router measures between them means something. Shapes: one per aspect
# class 1:3 .. 3:1 (export/shapes.py aspect_ladder: ViT at ~224^2, Swin at ~448^2 and ~896^2), the
# square first so `make serve` starts on it while the others export.
GLOBAL_MODEL ?= vit_small_patch16_224
GLOBAL_BUCKETS ?= 224,384x128,336x144,288x160,256x192,192x256,160x288,144x336,128x384
WINDOWED_MODEL ?= swin_tiny_patch4_window7_224
WINDOWED_BUCKETS ?= 448,896,756x252,700x308,588x336,532x392,392x532,336x588,308x700,252x756,1568x532,1372x588,1204x672,1008x756,756x1008,672x1204,588x1372,532x1568
PYTEST_ARGS ?=
# While `make serve` exports the other buckets, the server scans the repository this often (unless
# VITSERVE_POLL_S or POLL_S says otherwise) and loads each entry as it is published.
LAZY_POLL_S ?= 2
comma := ,
bucket_list = $(subst $(comma), ,$(1))
first_bucket = $(firstword $(call bucket_list,$(1)))
other_buckets = $(subst $(eval) ,$(comma),$(wordlist 2,99,$(call bucket_list,$(1))))
# Export both backbones at once (tracing is mostly one Python thread); fails if either fails, and a
# backbone without buckets to export is skipped. $(3) prefixes each command (e.g. with nice).
export_one = $(if $(3),$(4)$(VITSERVE) export --model $(1) --name $(2) --buckets $(3) --repository $(REPOSITORY),true)
export_both = $(call export_one,$(GLOBAL_MODEL),vit_global,$(1),$(3)) & g=$$!; \
	$(call export_one,$(WINDOWED_MODEL),swin_windowed,$(2),$(3)) & w=$$!; \
	wait $$g; gs=$$?; wait $$w; ws=$$?; [ $$gs -eq 0 ] && [ $$ws -eq 0 ]
other_exports = $(call export_both,$(call other_buckets,$(GLOBAL_BUCKETS)),$(call other_buckets,$(WINDOWED_BUCKETS)),$(1))

.PHONY: install test lint serve export bench bench-peers clean mlserver-env tools

# Serving needs no test or benchmark extras (torch is a dependency, pinned in pyproject.toml: one
# resolver pass); skipping byte-compilation at install saves more than compiling on first import
# costs (only imported modules are compiled). The virtualenv gets a current pip from the system's
# (PIP_BOOTSTRAP) instead of ensurepip's bundled one: ensurepip byte-compiles its pip, and pip 23's
# resolver took twice the CPU of 26's on this dependency set (34 s against 17 s for `pip install -e .`).
# Without a system pip, ensurepip's pip installs the current one.
PIP_BOOTSTRAP := 'pip>=26.2,<27'
$(STAMP): pyproject.toml
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install -qq --no-compile $(PIP_BOOTSTRAP) \
		|| { $(BIN)/python -m ensurepip && $(BIN)/python -m pip install -qq --no-compile $(PIP_BOOTSTRAP); }
	$(BIN)/pip install -qq --no-compile -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

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
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }
	@command -v kubectl >/dev/null || { echo "kubectl (with kustomize) is required: install the kubectl package" >&2; exit 1; }

$(FIRST_STAMP): | $(STAMP)
	$(call export_both,$(call first_bucket,$(GLOBAL_BUCKETS)),$(call first_bucket,$(WINDOWED_BUCKETS)))
	touch $(FIRST_STAMP)

$(REPOSITORY_STAMP): $(FIRST_STAMP)
	$(call other_exports)
	touch $(REPOSITORY_STAMP)

export: $(REPOSITORY_STAMP)

# The first request needs one bucket per backbone; the rest export beside the running server, at a
# lower priority so that start-up and requests keep the cores. The server is ready before it has
# measured any entry's cost (VITSERVE_CALIBRATION_MODE, unless the environment says otherwise):
# routes use FLOP estimates until each entry is measured, a few seconds later.
serve: $(STAMP) $(FIRST_STAMP)
	@test -e $(REPOSITORY_STAMP) || { echo "exporting the other buckets in the background (log: $(REPOSITORY)/.export.log)"; \
		{ { $(call other_exports,nice -n 10 ); } && touch $(REPOSITORY_STAMP); } > $(REPOSITORY)/.export.log 2>&1 & }
	VITSERVE_POLL_S=$${VITSERVE_POLL_S:-$(if $(wildcard $(REPOSITORY_STAMP)),0,$(LAZY_POLL_S))} \
	VITSERVE_CALIBRATION_MODE=$${VITSERVE_CALIBRATION_MODE:-background} \
		$(VITSERVE) serve --repository $(REPOSITORY) $(SERVE_FLAGS)

test: $(DEV_STAMP) $(MLSERVER_STAMP) tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.runtimes
	$(BIN)/python -m bench.attention
	@command -v hey >/dev/null || { apt-get update -qq && apt-get install -y -qq hey; }
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.batch_limit

# Peer frameworks for bench.peers, each in its own environment (not part of `make test`).
PEERS_VENV := .venv-peers
PEER_DEPS := onnxruntime==1.32.0 pillow==13.0.0 numpy==2.4.6
$(PEERS_VENV)/%/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)/$*
	$(PEERS_VENV)/$*/bin/pip install --quiet $(PEER_PACKAGE_$*) $(PEER_DEPS)
	touch $@
PEER_PACKAGE_litserve := litserve==0.2.19 python-multipart==0.0.34
PEER_PACKAGE_bentoml := bentoml==1.4.40
PEER_PACKAGE_ray := 'ray[serve]==2.60.0' python-multipart==0.0.34

bench-peers: $(DEV_STAMP) $(PEERS_VENV)/litserve/.installed $(PEERS_VENV)/bentoml/.installed $(PEERS_VENV)/ray/.installed
	@command -v hey >/dev/null || { apt-get update -qq && apt-get install -y -qq hey; }
	$(BIN)/python -m bench.peers

lint: $(DEV_STAMP)
	$(BIN)/ruff check models export service tests bench
	$(BIN)/ruff format --check models export service tests bench

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) $(PEERS_VENV) $(REPOSITORY) .pytest_cache
