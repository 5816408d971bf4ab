# Set-up and everyday commands. `make demo` and `make test` are the README's quickstart.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# The CPU build of torch on CPU-only machines: `pip install torch==2.13.0` takes the wheel that lies on the
# machine (pip's find-links) and never the CUDA build; on a GPU machine the same line takes the CUDA build.
TORCH   ?= torch==2.13.0
OUT     ?= out/example

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed  ## create .venv and install pws-batch with its dependencies

# The tiny models are random weights: the demo makes 4 candidates with 25 steps (not 8 and 100) to be quick.
demo: setup  ## set up, then run the example manifest end to end with the offline tiny models; write its gallery
	$(VENV)/bin/pws-batch run manifests/example.parquet --out $(OUT) --models tiny --candidates 4 --steps 25
	$(VENV)/bin/pws-batch gallery $(OUT)

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

bench: setup  ## the sampler benchmark: batched vs naive, printed as ratios
	$(VENV)/bin/pws-batch bench sampler --models tiny --candidates 8

clean:
	rm -rf $(VENV) out .pytest_cache
