# `make demo` and `make test` do all set-up themselves: they create .venv with a
# Python >= 3.12 (found on PATH or under pyenv) and install the package into it.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu bench clean

define find_python
for p in python3.14 python3.13 python3.12 $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 /root/.pyenv/versions/3.1[2-9]*/bin/python3 python3; do \
  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then echo $$p; exit 0; fi; \
done; exit 1
endef

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  base=$$( $(find_python) ) || { echo "error: need Python >= 3.12 (not found on PATH or under ~/.pyenv)" >&2; exit 1; }; \
	  echo "creating $(VENV) with $$base"; \
	  $$base -m venv $(VENV); \
	fi
	@echo "installing pisa-jax and its dependencies into $(VENV) (first run only; a few minutes) ..."
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pisa-jax demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

# On a machine with an NVIDIA GPU and jax[cuda12] installed.
test-gpu: $(STAMP)
	$(VENV)/bin/pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info
