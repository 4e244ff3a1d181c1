# butler-memory: every command installs what it needs into ./.venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv demo test lint parts airflow bench bench-scale lock clean

help:
	@echo "make demo     run the memory_compression DAG end to end on embedded MongoDB/Redis"
	@echo "make test     lint + the whole test suite (real services started by the suite)"
	@echo "make airflow  Airflow API server + scheduler + DAG processor on the embedded services (UI on 127.0.0.1:8080)"
	@echo "make bench    every benchmark but the scale one; prints figures (about 80 minutes on 2 cores)"
	@echo "make bench-scale  1,000 users at users_per_task 1, 10,000 at 20/50/200, 2,000 on Celery (about an hour)"
	@echo "make lock     regenerate requirements*.txt from requirements*.in"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	@# No .pyc files are written where PYTHONDONTWRITEBYTECODE is set (as on our CI image): every Airflow
	@# task process would compile its imports again (+0.25 CPU-s a task, docs/benchmarks.md). ~6 s once.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null
	touch $(STAMP)

demo: venv
	$(BIN)/python tools/demo.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check dags plugins tools tests
	$(BIN)/ruff check --select AIR --preview dags plugins tools
	$(BIN)/mypy plugins/butler_memory plugins/butler_memory_preload.py dags tools

# Coverage across every process the suite starts (pyproject.toml [tool.coverage]), line and branch,
# on plugins/ and dags/; combined and printed at the end, and the run fails under 80%.
test: venv lint parts
	rm -f .coverage .coverage.*
	BUTLER_REPO=$(CURDIR) $(BIN)/python -m coverage run -m pytest --durations=30
	BUTLER_REPO=$(CURDIR) $(BIN)/python -m coverage combine --quiet
	BUTLER_REPO=$(CURDIR) $(BIN)/python -m coverage report

# Debian's chromium (browser tests), prometheus (promtool) and postgresql (Airflow's metadata DB):
# installed with apt-get when missing and running as root. Without them their tests skip, saying why;
# under CI=true a missing one fails the run (tools/parts.py).
parts: venv
	$(BIN)/python tools/parts.py install

airflow: venv
	$(BIN)/python tools/standalone.py

# Every table of docs/benchmarks.md but §12 (make bench-scale), in one run (issue 25).
bench: venv
	$(BIN)/python tools/bench.py
	$(BIN)/python tools/bench_fresh.py
	$(BIN)/python tools/bench_client.py
	$(BIN)/python tools/bench_scan.py
	$(BIN)/python tools/bench_batch.py
	$(BIN)/python tools/bench_history.py
	$(BIN)/python tools/bench_guards.py --users 300 --chunk 20 --out .local/bench/guards300.json

# Issue 20 item 6: users per task against Airflow's price per task, on PostgreSQL (docs/benchmarks.md §12).
bench-scale: venv
	$(BIN)/python tools/bench_scale.py --celery-users 2000

lock: venv
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile --python-version 3.11 --python-platform x86_64-unknown-linux-gnu requirements.in -o requirements.txt
	$(BIN)/uv pip compile --python-version 3.11 --python-platform x86_64-unknown-linux-gnu requirements-dev.in -o requirements-dev.txt

clean:
	rm -rf .local .pytest_cache .ruff_cache .coverage .coverage.*
