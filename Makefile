PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
MODEL ?= models/tiny-llama
PORT ?= 3000

.PHONY: install proto run test test-all test-gpu lint bench docker model

install:
	$(PIP) install -q -e '.[test,dev,bench]'
	# TGI's own Python client pins huggingface_hub<1, which transformers 5 rules out; its
	# code runs fine with the newer hub, so it is installed without its pins for the tests.
	$(PIP) install -q --no-deps 'text-generation==0.7.0'

# Regenerate the gRPC stubs in place (the build does this too).
proto:
	$(PYTHON) setup.py -q proto

# A default model made locally (no hub access needed); pass MODEL=... to serve another.
models/tiny-llama:
	tgi-make-model $@ --arch llama --size small

model: $(MODEL)

run: install model
	tgi-launch --model-id $(MODEL) --port $(PORT)

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m 'not gpu'

test-gpu: install
	$(PYTHON) -m pytest -q -m gpu

lint:
	$(PYTHON) -m ruff check proto router shard launcher tests

bench: install
	$(PYTHON) -m tgi_server.launcher.bench

docker:
	docker build -f docker/Dockerfile -t tgi-server:cpu .
