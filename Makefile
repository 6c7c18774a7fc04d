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
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,timm,web]'
	touch $(STAMP)

venv: $(STAMP)

# A real full head for the clinical-style demo and bench pairs: pydeface 2.1.0's averaged T1 (MIT),
# fetched with pip into the cache the tests use (Testing/realdata.py); the product never downloads.
DATA_CACHE := $(or $(RANO_RESPONSE_DATA_CACHE),$(HOME)/.cache/rano-response)
HEAD_DIR   := $(DATA_CACHE)/pydeface-2.1.0
DEMO_HEAD  := $(HEAD_DIR)/pydeface/data/mean_reg2mean.nii.gz

$(DEMO_HEAD): | $(STAMP)
	rm -rf $(HEAD_DIR)/.download-make
	$(PY) -m pip download --quiet --no-deps --only-binary :all: -d $(HEAD_DIR)/.download-make pydeface==2.1.0
	$(PY) -c 'import glob, os, sys, zipfile; wheel, = glob.glob(sys.argv[1] + "/pydeface-*.whl"); \
	os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True); \
	open(sys.argv[2] + ".part", "wb").write(zipfile.ZipFile(wheel).read("pydeface/data/mean_reg2mean.nii.gz")); \
	os.replace(sys.argv[2] + ".part", sys.argv[2])' $(HEAD_DIR)/.download-make $@
	rm -rf $(HEAD_DIR)/.download-make

demo: $(STAMP) $(DEMO_HEAD)
	$(PY) -m RANOResponseLib.demo --head $(DEMO_HEAD)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP) $(DEMO_HEAD)
	$(VENV)/bin/rano-response bench --runs 3 --head $(DEMO_HEAD)

clean:
	rm -rf $(VENV) demo-output *.egg-info
