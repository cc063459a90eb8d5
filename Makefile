# Two commands matter: `make demo` (set up + run the course's main job) and `make test`.
# A conda env made from environment.yml, when active, is used instead of .venv.
SHELL := /bin/bash
PYTHON ?= python3

ifeq ($(CONDA_DEFAULT_ENV),mlc-course)
  PY := python
  STAMP := $(CONDA_PREFIX)/.mlc_course_installed
else
  PY := .venv/bin/python
  STAMP := .venv/.installed
endif

.PHONY: demo test lab install model unit notebooks clean-cache book

$(STAMP): pyproject.toml
	@if [ "$(PY)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then \
	  echo "creating .venv with $$($(PYTHON) --version)"; $(PYTHON) -m venv .venv; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m mlc_course fetch

demo: model
	$(PY) -m mlc_course demo

unit: install
	$(PY) -m pytest -q tests

notebooks: install
	$(PY) -m pytest -q --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg

test: model
	$(PY) -m pytest -q tests --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg

lab: install
	$(PY) -m jupyter lab notebooks

# The course as a static website: build/book/index.html. It renders the committed, executed
# notebooks; `make book EXECUTE=1` runs every notebook first (needs `make demo` once).
book: install
	$(PY) scripts/build_book.py --out build/book $(if $(EXECUTE),--execute)

clean-cache:
	$(PY) -m mlc_course cache --clear
