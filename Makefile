# One command each: set up, run the app on the embedded model, run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup app test lint bench

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	@# browser tests drive Debian's Chromium (playwright's own browser downloads are not used)
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "note: install Debian's chromium and chromium-driver for the browser tests"; fi; \
	fi
	@# the CPU sampling kernel (dalle_mini/cpu_kernels) is compiled on first use with g++
	@if ! command -v g++ >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq g++ >/dev/null; \
		else echo "note: install g++ for the fast CPU sampler (XLA's products are used without it)"; fi; \
	fi

app:
	$(BIN)/python app.py --model embedded

test:
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench:
	$(BIN)/python bench/bench_speed.py
