# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need: the CPU build of torch first, then omnitok.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omnitok-installed
DEMO_OUT ?= runs/demo

.PHONY: install browser demo test lint bench clean

install: $(STAMP)

# Installing is paid from the demo's 15 minutes, so it is made fast (benchmarks/install_time.py: 103 s with plain pip
# on the 2-core machine, 59 s this way). pip still installs torch, because only pip's configuration knows where the
# CPU build lies, but without byte-compiling (pip does it one file at a time): what it installed (torch, sympy,
# networkx, ...) is compiled afterwards on every core. Files that need a newer Python fail there as they do, silently,
# in pip. Left uncompiled, each process the demo starts imports ~2.5 s slower where Python may not write __pycache__.
# uv then resolves, downloads and compiles the rest in parallel, keeping the installed torch (it satisfies
# pyproject's range). Where uv cannot be installed or fails, pip does it all.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m compileall -q -j 0 $(VENV)/lib/python3*/site-packages >/dev/null || true
	($(PY) -m pip install --quiet uv \
	  && $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode -e '.[test]') \
	  || (echo "uv could not install omnitok (above); installing it with pip instead" \
	      && $(PY) -m pip install --quiet -e '.[test]')
	touch $(STAMP)

# The demo's budget counts from when make started, so that creating .venv on a fresh machine is paid from it.
DEMO_START := $(shell date +%s)

demo: $(STAMP)
	$(VENV)/bin/omnitok demo --out $(DEMO_OUT) --started-at $(DEMO_START)

# The chat page's browser test drives Debian's chromium + chromium-driver; installed here when run as root,
# otherwise that test skips (with a warning here).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  || (test "$$(id -u)" = 0 && command -v apt-get >/dev/null && apt-get update -qq \
	      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "warning: chromium/chromedriver missing and not installable here; the browser test will skip"

test: $(STAMP) browser
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
