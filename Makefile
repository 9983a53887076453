# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it; the install is skipped
# when pyproject.toml has not changed since the last one (stamp file), so re-runs start in seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,batch]'
	touch $(STAMP)

# The demo: a held-out randomised hologram sequence (seed not used in training; objects 20 px out of
# focus, with its background hologram) replayed through the threaded pipeline with the shipped weights
# -> out/demo.gif, out/demo.mp4, per-frame CSV, timings.
DEMO_SEQ := out/demo_sequence
demo: $(STAMP)
	$(PY) -m app.synth --out $(DEMO_SEQ) --frames 48 --size 512 --seed 2029 --randomize \
		--set synth.defocus_px=20 --set 'synth.keep=[defocus_px]'
	$(PY) -m app.replay $(DEMO_SEQ)/images --background $(DEMO_SEQ)/background.png \
		--gif out/demo.gif --out out/demo.mp4 --csv out/demo_frames.csv --stats out/demo_stats.json
	@echo "demo written: out/demo.gif out/demo.mp4 (per-frame statistics: out/demo_frames.csv)"

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf out .pytest_cache
