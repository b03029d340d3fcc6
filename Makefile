# ocibuild: set-up, demo, tests, protocol code and benchmarks.
# Every target is idempotent and works on a fresh Debian machine as root.

SHELL := /bin/bash
PY_SYS ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
# golang-github-opencontainers-specs-dev: the OCI runtime-spec JSON schema
# (stages/oci/schema.py reads it from /usr/share/gocode/...).
APT_PACKAGES := python3 runc bubblewrap libseccomp2 slirp4netns iproute2 fuse3 libfuse3-dev pkg-config busybox-static nix-bin b3sum graphviz \
  golang-github-opencontainers-specs-dev
# pip: errors only. Machines with find-links or extra indexes that do not exist
# would print a warning per package; `make` prints what it does instead.
PIP := $(PY) -m pip --disable-pip-version-check -qq
# Nix for tests and the demo: single-user root, sandbox on. The config lives in
# the repo (.nix/nix.conf) and is selected with NIX_CONF_DIR, so nothing else
# on the machine changes.
NIX_CONF_DIR := $(CURDIR)/.nix
export NIX_CONF_DIR
export NIX_REMOTE := local

.PHONY: install apt venv bytecode nix-setup sources demo lint test test-reverse proto bench clean

install: apt venv bytecode nix-setup sources

# Real upstream C sources for the real-compile test and bench (Brotli: a
# library and its command-line tool), as the PyPI sdist ships them; checked.
SOURCES := $(CURDIR)/.cache/sources
BROTLI_SDIST := $(SOURCES)/Brotli-1.1.0.tar.gz
BROTLI_SHA256 := 81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724

sources: $(BROTLI_SDIST)

$(BROTLI_SDIST): | venv
	@echo "sources: fetching the Brotli 1.1.0 sdist into $(SOURCES)"
	@mkdir -p $(SOURCES)
	@$(PIP) download --no-deps --no-binary :all: --dest $(SOURCES).tmp Brotli==1.1.0
	@echo "$(BROTLI_SHA256)  $(SOURCES).tmp/Brotli-1.1.0.tar.gz" | sha256sum -c --quiet
	@mv $(SOURCES).tmp/Brotli-1.1.0.tar.gz $@ && rmdir $(SOURCES).tmp

# Byte-compile the project (an editable install leaves that to first import,
# which never happens where PYTHONDONTWRITEBYTECODE is set, as on CI machines):
# every ocibuild command would compile ~40 modules at start, ~0.2 s. Up-to-date
# files are skipped.
bytecode: venv
	@$(PY) -m compileall -q -j 0 pipeline stages

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  log=$$(mktemp); \
	  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } >$$log 2>&1; \
	  then cat $$log; rm -f $$log; exit 1; fi; rm -f $$log; \
	fi

$(VENV)/.installed: pyproject.toml
	@echo "venv: installing ocibuild (editable, with test extras) into $(VENV)"
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@$(PIP) install -e '.[test,ray]'
	@touch $@

venv: apt $(VENV)/.installed

nix-setup: $(NIX_CONF_DIR)/nix.conf

$(NIX_CONF_DIR)/nix.conf:
	@echo "nix: writing $@ (single-user root, sandbox on)"
	@mkdir -p $(NIX_CONF_DIR)
	@printf '%s\n' 'sandbox = true' 'build-users-group =' 'substituters =' \
	  'experimental-features = nix-command' 'max-jobs = 2' > $@.tmp
	@mv $@.tmp $@

# The castore demo, then a real build on the embedded store (default state dir),
# then a chain of Nix derivations built by ocibuild and by Nix, NAR hashes compared.
demo: install
	$(PY) dag_examples/demo.py
	@echo
	$(PY) dag_examples/build_hello.py
	@echo
	$(PY) dag_examples/nix_chain.py

# The import layers of README's developer section (import-linter).
lint: install
	@echo "lint: import layers"
	@$(VENV)/bin/lint-imports --no-cache | grep -E "KEPT|BROKEN|Contracts:|->|imports" ; \
	  test $${PIPESTATUS[0]} -eq 0
	@echo "lint: ruff"
	@$(VENV)/bin/ruff check --no-cache -q .
	@echo "lint: mypy (strict on pipeline/, checked bodies on stages/)"
	@$(PY) -m mypy --no-incremental

test: lint
	$(PY) -m pytest -q tests dag_examples

# The same suite in reverse order: a test that passes only after another one
# made its state fails here.
test-reverse: install
	$(PY) -m pytest -q --reverse tests dag_examples

proto: venv
	$(PY) -m grpc_tools.protoc -I . \
	  --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  stages/proto/*.proto

bench: install
	@$(PIP) install -e '.[test,ray,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(NIX_CONF_DIR)
