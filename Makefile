# Every target bootstraps .venv on its own: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1
export MPLBACKEND := Agg

.PHONY: all demo test bench venv clean

all: test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,timm]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m RANOResponseLib.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/rano-response bench --runs 3

clean:
	rm -rf $(VENV) demo-output *.egg-info
