# pdx: two commands do all the set-up on a fresh machine.
#   make run    set up, then run the main job
#   make test   set up, then run the test suite
VENV := .venv
PY := $(VENV)/bin/python
export UCX_NET_DEVICES ?= lo
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: venv run test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/pdx demo

test: venv
	$(PY) -m pytest -q -rs --durations=25 $(PYTEST_ARGS)
	# ucx's contract run in a pytest process of its own: NIXL bundles another UCX build, and the
	# two in one process do not survive a peer killed mid-write (docs/transports.md, Testing)
	PDX_TEST_TRANSPORTS=ucx $(PY) -m pytest -q -rs -m ucx tests/transports $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: venv
	$(PY) -m pytest -q -rs -m "not vllm and not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check pdx transports kernels tests
	$(VENV)/bin/mypy pdx transports kernels

bench: venv
	$(VENV)/bin/pdx bench transport --quick

clean:
	rm -rf $(VENV) build *.egg-info
