# `make demo` and `make test` set up everything on a fresh machine: the venv is built on first use.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-pipeline bench-memory gpu-wheels clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# 400 steps of 2 x 8 sequences: enough for the held-out loss to fall below 60% of where it starts.
demo: $(STAMP)
	$(VENV)/bin/parallax train configs/gpt-tiny.yaml --nproc 2 train.micro_batch_size=8 train.steps=400

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(VENV)/bin/python bench/overhead.py

# PP=2 over 2 gloo ranks against one rank: measured efficiency beside the bubble model (docs/pipeline-bench.md).
bench-pipeline: $(STAMP)
	$(VENV)/bin/python bench/pipeline.py

# Recurrent memory on the built-in long-context task: 3 seeds and a no-memory baseline, accuracy out to 1,024
# segments, memory and time while reading 1,024 (docs/memory.md); about 40 minutes on 2 cores.
bench-memory: $(STAMP)
	$(VENV)/bin/python bench/memory.py

# What bench/gpu/smoke.sh needs on a bare one-GPU machine, in .gpu/carry (docs/gpu-smoke.md). The
# wheels are pinned to the venv's versions; an existing venv is used as it is, never reinstalled.
gpu-wheels:
	test -x $(VENV)/bin/python || $(MAKE) $(STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python bench/gpu/prepare.py

clean:
	rm -rf $(VENV) runs hf .gpu
