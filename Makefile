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

.PHONY: env demo test clean gpu-wheels

# The wheels `python -m lora_train bench gpu` needs on a GPU machine that has torch, transformers 5, peft and
# safetensors but not these (no network there): they travel with the tree (about 10 MB). diffusers 0.26.3 cannot
# import beside transformers 5's huggingface_hub 1.x (it imports the removed cached_download), hence a newer one.
# Install there with: pip install --no-deps --no-index gpu-wheels/*.whl && python -m lora_train bench gpu
GPU_WHEELS := diffusers==0.36.0 requests urllib3 idna charset_normalizer certifi
gpu-wheels:
	rm -rf gpu-wheels && mkdir gpu-wheels
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --implementation py --abi none --platform any \
		--python-version 3.12 -d gpu-wheels $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d gpu-wheels pillow
	@ls gpu-wheels/*.whl | grep -v -e py3-none-any -e '^gpu-wheels/pillow-' && \
		{ echo "error: a wheel above is not pure Python"; exit 1; } || true
	@du -ch gpu-wheels/*.whl | tail -1

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
	rm -rf $(VENV) demo .pytest_cache gpu-wheels
