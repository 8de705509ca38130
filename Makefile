# The two commands of the README, plus a development build.
.PHONY: demo test dev

demo:  ## set up .venv (first run: a few minutes) and run the main job
	scripts/setup.sh
	.venv/bin/lorakit demo

test:  ## set up .venv, lint, and run every test against the installed wheel
	scripts/test.sh

dev:  ## incremental build into python/lorakit; then: PYTHONPATH=python .venv/bin/pytest
	PYTHON=.venv/bin/python scripts/dev_build.sh
