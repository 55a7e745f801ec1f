# cadbcnn — plain make targets. `make test` and `make demo` are the README's set-up commands.
PY        ?= python3
VENV      ?= .venv
RT_VENV   ?= .venv-runtime
BIN        = $(VENV)/bin
TORCH_PIN  = torch==2.14.1 torchvision==0.29.1
TEST_MODEL = build/test-model.onnx
MODEL     ?= models/cadbcnn.onnx

.PHONY: install install-runtime test test-main test-runtime demo bench clean

install: $(VENV)/.installed
install-runtime: $(RT_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[train,dev,distributed]"
	touch $@

# A second environment with the runtime's dependencies only — no torch at all.
$(RT_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(RT_VENV)
	$(RT_VENV)/bin/pip install -q --upgrade pip
	$(RT_VENV)/bin/pip install -q -e . pytest
	@! $(RT_VENV)/bin/python -c "import torch" 2>/dev/null || (echo "torch leaked into $(RT_VENV)"; exit 1)
	touch $@

test: test-main test-runtime

test-main: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# Runtime tests in the torch-free environment, on a model exported by the main one.
test-runtime: $(VENV)/.installed $(RT_VENV)/.installed
	$(BIN)/python tests/make_test_model.py $(TEST_MODEL)
	CADBCNN_TEST_MODEL=$(TEST_MODEL) $(RT_VENV)/bin/python -m pytest -q -m runtime -p no:cacheprovider

# The main job: classify the bundled sample images with the released model.
demo: $(VENV)/.installed
	@if [ -f $(MODEL) ]; then \
		$(BIN)/cadbcnn-infer models/samples --model $(MODEL) --out - ; \
	else \
		echo "No released model at $(MODEL) yet: training a few steps on a tiny synthetic set instead."; \
		$(BIN)/python scripts/demo_synthetic.py; \
	fi

bench: $(VENV)/.installed
	$(BIN)/cadbcnn-bench --out build/bench

clean:
	rm -rf build .pytest_cache
