# Set-up and everyday commands. `make demo` and `make test` are the README's quickstart.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# The CPU build of torch on CPU-only machines: `pip install torch==2.13.0` takes the wheel that lies on the
# machine (pip's find-links) and never the CUDA build; on a GPU machine the same line takes the CUDA build.
TORCH   ?= torch==2.13.0
OUT     ?= out/demo

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed  ## create .venv and install pws-batch with its dependencies

demo: setup  ## set up, then make 4 candidates for one pair with the offline tiny models
	$(VENV)/bin/pws-batch generate --models tiny --image-prompt "dogs, grayscale" \
		--audio-prompt "dogs barking, clean audio" --candidates 4 --steps 25 --out $(OUT)

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

bench: setup  ## the sampler benchmark: batched vs naive, printed as ratios
	$(VENV)/bin/pws-batch bench sampler --models tiny --candidates 8

clean:
	rm -rf $(VENV) out .pytest_cache
