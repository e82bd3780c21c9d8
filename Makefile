# The quick start's two commands, each setting up what it needs first and fast once it is set up:
#   make pipeline   the virtual environment .venv with the pinned packages (once), then `dvc repro`
#   make test       the same environment, then every test on two processes (CI runs this)
# PYTEST_ARGS narrows the tests: make test PYTEST_ARGS="-m 'not slow'".

VENV := .venv
# Touched once requirements.txt is installed into .venv: the install runs again only when it changes.
INSTALLED := $(VENV)/installed
# The stages' `python`, dvc's and mlflow's: the environment's, activated or not.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: pipeline test

pipeline: $(INSTALLED)
	dvc repro

test: $(INSTALLED)
	python -m pytest -n 2 $(PYTEST_ARGS)

$(INSTALLED): requirements.txt
	python3 -m venv $(VENV)
	python -m pip install -r requirements.txt
	touch $@
