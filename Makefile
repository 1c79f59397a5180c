# The two set-up commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= gateway.yaml

.PHONY: run test redis-server chromium real-backend lint schema bench clean

$(BIN)/multiverse: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

run: $(BIN)/multiverse          ## start the gateway with gateway.yaml on embedded SQLite
	$(BIN)/multiverse serve --config $(CONFIG)

test: $(BIN)/multiverse         ## install what the tests need and run the whole suite
	@command -v redis-server >/dev/null || $(MAKE) --no-print-directory redis-server
	@[ -x /usr/bin/chromium ] || $(MAKE) --no-print-directory chromium
	@$(MAKE) --no-print-directory real-backend
	$(BIN)/python -m pytest -q

redis-server:                   ## install redis-server, which the shared-state tests start (Debian/Ubuntu, as root)
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y --no-install-recommends redis-server \
		|| { apt-get update && apt-get install -y --no-install-recommends redis-server; }; \
	else \
		echo "redis-server is missing and cannot be installed here (needs apt-get as root): install it" \
			"(apt-get install redis-server, brew install redis) and run make test again" >&2; \
		exit 1; \
	fi

chromium:                       ## install Debian's chromium, which the dashboard's browser test drives through Playwright
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y --no-install-recommends chromium \
		|| { apt-get update && apt-get install -y --no-install-recommends chromium; }; \
	else \
		echo "/usr/bin/chromium is missing and cannot be installed here (needs apt-get as root): install it" \
			"(apt-get install chromium) and run make test again; Playwright's own browser download is not used" >&2; \
		exit 1; \
	fi

real-backend: $(BIN)/multiverse  ## build llama-cpp-python's server + Gemma 3 270M into a cached venv (the real_backend tests)
	@if ! { command -v cmake && command -v c++; } >/dev/null; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get install -y --no-install-recommends build-essential cmake \
			|| { apt-get update && apt-get install -y --no-install-recommends build-essential cmake; }; \
		else \
			echo "cmake and a C++ compiler are missing and cannot be installed here (needs apt-get as root):" \
				"install them (apt-get install build-essential cmake) and run make test again" >&2; \
			exit 1; \
		fi; \
	fi
	$(BIN)/python -m tests.real_backend

lint: $(BIN)/multiverse
	$(BIN)/ruff check gateway plugins tests bench
	$(BIN)/ruff format --check gateway plugins tests bench
	$(BIN)/mypy

schema: $(BIN)/multiverse       ## regenerate config/gateway.schema.json from the config model
	$(BIN)/multiverse schema > config/gateway.schema.json

bench: $(BIN)/multiverse        ## direct vs nginx vs through-the-gateway benchmark (see docs/benchmarks.md)
	$(BIN)/python bench/bench_proxy.py $$(command -v wrk >/dev/null && echo --wrk 5)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
