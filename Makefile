# Development tasks. `make test` works on a fresh machine: it creates .venv,
# installs the CPU torch first (an unpinned torchvision would pull CUDA torch),
# then everything else under constraints.txt, then runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test golden bench bench-compress completions-check clean

test: $(VENV)/.installed
	$(PY) -m pytest -q

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[convert,test]'
	@if $(PY) -m pip list 2>/dev/null | grep -iE '^(nvidia|triton)'; then \
		echo "CUDA packages were installed; check constraints.txt" >&2; exit 1; fi
	touch $@

# Rewrite every golden file (help, output formats, token ids, completions/) from the current output; review the diff.
golden: $(VENV)/.installed
	$(PY) -m pytest -q --update-golden -m "not convert"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_import.py

# The compression proof: tiny teacher, stage 1 + 2, ablations; about 50 minutes on 2 cores.
bench-compress: $(VENV)/.installed
	$(PY) benchmarks/bench_compress.py

clean:
	rm -rf $(VENV) bench-out .pytest_cache
