# make setup | make demo | make test   (see README.md)
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
REQS := requirements.txt requirements-nodeps.txt

.PHONY: setup demo demo-long test test-fast bench clean-runs

# Idempotent: re-runs pip only when a requirements file changed since the last setup.
# pip -qq prints errors only: a host whose pip config names index directories it lacks
# printed ~170 "Location ... is ignored" warnings on a first setup.
setup: $(STAMP)

$(STAMP): $(REQS)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -qq --upgrade pip
	@echo "installing requirements.txt into $(VENV) (a few minutes the first time; only pip's errors show)"
	$(VPY) -m pip install -qq -r requirements.txt
	$(VPY) -m pip install -qq --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

demo: setup
	$(VPY) tools/demo.py

# The longer recipe (about 2 hours on 2 cores; resumes when run again), with its
# learning curve in runs/demo-long/learning_curve.png.
demo-long: setup
	$(VPY) tools/demo.py --long

# Two pytest-xdist workers by default: most tests wait on the processes they launch, so
# two at once keep both cores busy (29 -> 24 min on this 2-core machine). TEST_WORKERS=0 runs one process;
# a larger machine can raise it. tests/conftest.py says which tests share a worker.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

test: setup
	$(VPY) -m pytest -q $(XDIST) --durations=20 tests

test-fast: setup
	$(VPY) -m pytest -q $(XDIST) -m "not slow" tests

bench: setup
	$(VPY) tools/bench.py
