# Development tasks. `make test` works on a fresh machine: it creates .venv, installs
# the CPU builds of torch and torchvision (tools/install_torch.py: from PyTorch's CPU
# index, or from pip's own sources when that index does not answer), then everything
# else under constraints.txt, then runs the suite. .ci/run runs the other checks after it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where torch and torchvision come from; empty for pip's configured sources only.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
export TORCH_INDEX_URL
BASE_VENV ?= .venv-base
LATEST_VENV ?= .venv-latest
SIZE_VENV ?= .venv-size
# What the base install may take on disk (MiB, all distributions in a fresh venv; 642.6 measured
# with constraints.txt on Linux x86_64, Python 3.11): see check-size.
BASE_BUDGET_MIB ?= 645

RAY_VENV ?= .venv-ray
# A variable, because commas written in a $(call) argument would split it.
RAY_EXTRAS := test,ray,ray-test

.PHONY: test lint check-wheel test-base test-latest check-size test-ray golden bench bench-ray bench-compress clean

test: $(VENV)/.installed
	$(PY) -m pytest -q

$(VENV)/.installed: pyproject.toml constraints.txt tools/install_torch.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PYTHON) tools/install_torch.py --python $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[convert,test,lint,ui]'
	# The web page's browser tests: Debian's headless Chromium and its version-locked chromedriver.
	command -v chromedriver >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; }
	@if $(PY) -m pip list 2>/dev/null | grep -iE '^(nvidia|triton)'; then \
		echo "error: the CUDA build of torch was installed (packages above): torch came from a source" \
			"that only has that build (PyPI), not from the CPU index TORCH_INDEX_URL='$(TORCH_INDEX_URL)'." \
			"Make that index reachable, or set TORCH_INDEX_URL to an index or mirror that serves" \
			"torch's CPU build, then run: make clean test" >&2; \
		exit 1; fi
	touch $@

# ruff (its default rules, version pinned in constraints.txt) and mypy (configured in pyproject.toml).
lint: $(VENV)/.installed
	$(PY) -m ruff check clipgrep tests tools
	$(PY) -m mypy clipgrep

# The wheel must ship the completion scripts, the typing marker and the licence.
check-wheel: $(VENV)/.installed
	rm -rf build/wheel
	$(PY) -m pip wheel -q --no-deps . -w build/wheel
	$(PY) -m zipfile -l build/wheel/clipgrep-*.whl > build/wheel/contents.txt
	@for f in completions/clipgrep.bash completions/clipgrep.zsh completions/clipgrep.fish \
			clipgrep/py.typed licenses/LICENSE licenses/third_party_licenses/onnx-LICENSE; do \
		grep -q "$$f" build/wheel/contents.txt || { echo "error: the wheel lacks $$f" >&2; exit 1; }; done

# The base install alone (no extras, so no torch) must pass the runtime tests.
# open_clip_torch comes without its dependencies, unimportable: the tests copy the
# CLIP vocabulary it ships into their tiny bundles, and nothing may import it.
test-base: $(BASE_VENV)/.installed
	$(BASE_VENV)/bin/python -m pytest -q -m "not convert"

# A fresh venv at $(1) with the install of extras $(2) and no torch ($(3) names it in the error).
define venv_without_torch
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q -c constraints.txt -e '.[$(2)]'
	$(1)/bin/python -m pip install -q -c constraints.txt --no-deps open_clip_torch
	@if $(1)/bin/python -m pip list 2>/dev/null | grep -iE '^torch'; then \
		echo "error: $(3) pulled in torch (above)" >&2; exit 1; fi
	touch $(1)/.installed
endef

$(BASE_VENV)/.installed: pyproject.toml constraints.txt
	$(call venv_without_torch,$(BASE_VENV),test,the base install)

# index --engine ray and search --table: the ray extra without torch (its own venv, so the other
# runs keep showing that the ray tests skip cleanly without it), and only the tests marked ray.
test-ray: $(RAY_VENV)/.installed
	$(RAY_VENV)/bin/python -m pytest -q -m ray

$(RAY_VENV)/.installed: pyproject.toml constraints.txt
	$(call venv_without_torch,$(RAY_VENV),$(RAY_EXTRAS),the ray extra)

# The newest versions pyproject.toml allows, without constraints.txt: what pipx and uv
# users get. Always a fresh venv, so that new releases are picked up.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q -e '.[test]'
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps open_clip_torch
	@$(LATEST_VENV)/bin/python -m pip list --format=freeze 2>/dev/null \
		| grep -iE '^(numpy|onnxruntime|lancedb|pyarrow|pillow|typer|rich|filelock|pathspec)=='
	$(LATEST_VENV)/bin/python -m pytest -q -m "not convert"

# The base install (no extras), as a user gets it, must stay within its budget. The table says what
# each distribution costs and who needs it (tools/install_size.py); the README's table comes from it.
check-size:
	rm -rf $(SIZE_VENV)
	$(PYTHON) -m venv $(SIZE_VENV)
	$(SIZE_VENV)/bin/python -m pip install -q -c constraints.txt .
	$(PYTHON) tools/install_size.py --python $(SIZE_VENV)/bin/python --budget-mib $(BASE_BUDGET_MIB)

# Rewrite every golden file (help, output formats, token ids, clipgrep/completions/) from the current output; review the diff.
golden: $(VENV)/.installed
	$(PY) -m pytest -q --update-golden -m "not convert"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_import.py
	$(PY) benchmarks/bench_ui.py

# --engine ray against the local index on the same 2,000 images, and the shard-resume cost.
bench-ray: $(RAY_VENV)/.installed
	$(RAY_VENV)/bin/python benchmarks/bench_ray.py

# The compression proof: tiny teacher, stage 1 + 2, ablations; about 50 minutes on 2 cores.
bench-compress: $(VENV)/.installed
	$(PY) benchmarks/bench_compress.py

clean:
	rm -rf $(VENV) $(BASE_VENV) $(LATEST_VENV) $(SIZE_VENV) build/wheel bench-out .pytest_cache
