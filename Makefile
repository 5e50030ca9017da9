# The two commands of the README: `make demo` and `make test`. Each builds .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check bench clean vectors services

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,postgres]'
	test -x $(BIN)/fogpay
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fogpay demo --out demo-out

# Mosquitto and PostgreSQL: installed here where it can be (root and apt-get); otherwise the
# tests that need them skip, with one line at the end saying how to enable them.
# Two workers (pytest-xdist): the tests wait on brokers and processes as much as they compute,
# and every test has its own ports, files and schema.
test: $(STAMP)
	@bash .ci/services.sh install-if-possible
	$(BIN)/python -m pytest -q -n 2

services:
	bash .ci/services.sh install

check: $(STAMP)
	$(BIN)/ruff format --check protocol runtime fog edge cloud fogpay tests bench
	$(BIN)/ruff check protocol runtime fog edge cloud fogpay tests bench
	$(BIN)/mypy protocol runtime fog edge cloud fogpay

vectors: $(STAMP)
	$(BIN)/python -m protocol.vectors
	$(BIN)/python -m protocol.leasing_vectors
	$(BIN)/python -m protocol.sealed_vectors
	$(BIN)/python -m protocol.gossip_vectors
	$(BIN)/python -m protocol.held_vectors
	$(BIN)/python -m protocol.transfer_vectors
	$(BIN)/python -m protocol.replica_vectors
	$(BIN)/python -m protocol.voucher_vectors

bench: $(STAMP)
	$(BIN)/python bench/fog.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
