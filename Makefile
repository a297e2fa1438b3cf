# `make test` and `make demo` each set up everything they need in .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-gpu lint demo clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing below pulls a multi-gigabyte CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

# ruff, configured in pyproject.toml (pycodestyle, pyflakes, import order, bugbear; 119 columns)
lint: $(STAMP)
	$(PY) -m ruff check .

# The whole editing pipeline on a tiny RANDOM-weight model (configs/tiny.yaml), on the CPU:
# writes outputs/demo.mp4 and outputs/demo_compare.mp4 (source | edit).
demo: $(STAMP)
	@echo "make demo: the tiny model has RANDOM weights; the output shows the pipeline runs, not a real edit."
	@echo "make demo: for real edits download the weights and run inference.py on a GPU (see README.md)."
	@mkdir -p outputs
	$(PY) inference.py --config configs/tiny.yaml --input assets/demo_input.mp4 \
		--prompt "$$(cat assets/demo_prompt.txt)" --output outputs/demo.mp4 --compare --overwrite

clean:
	rm -rf $(VENV) .pytest_cache outputs
