# Thin aliases for scripts/dev.py, which does the work (docs/development.md).
# make test ARGS="-k ledger -x" passes ARGS to pytest (and then skips ruff and mypy).

PYTHON ?= python3

.PHONY: run test check stop

run:
	$(PYTHON) scripts/dev.py run

test:
	$(PYTHON) scripts/dev.py test $(ARGS)

# What CI runs: format, lint, types, the whole suite.
check:
	$(PYTHON) scripts/dev.py test

stop:
	$(PYTHON) scripts/dev.py stop
