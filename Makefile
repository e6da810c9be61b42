# Two commands on a fresh machine: `make demo` (the whole job on a tiny built-in model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests and the demo run on the CPU with one thread (two are 5-10x slower and erratic on small machines),
# and never reach for a model hub.
export OMP_NUM_THREADS = 1
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: env demo test clean

env: $(STAMP)

$(STAMP): requirements/test.txt requirements/ldm.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements/test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/ldm.txt
	touch $(STAMP)

demo: env
	$(PY) -m lora_train demo --out demo

test: env
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) demo .pytest_cache
