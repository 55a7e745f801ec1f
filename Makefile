# cadbcnn — plain make targets. `make test` and `make demo` are the README's set-up commands.
PY        ?= python3
VENV      ?= .venv
RT_VENV   ?= .venv-runtime
BIN        = $(VENV)/bin
TORCH_PIN  = torch==2.14.1 torchvision==0.29.1
TEST_MODEL = build/test-model.onnx
MODEL     ?= models/cadbcnn.onnx

# Debian packages of the GUI tests: a real X server with OpenGL for the napari widget, headless Chromium for
# the HTML report. Installed when missing and we are root with apt-get; otherwise those tests skip.
SYSDEPS = xvfb xauth chromium libgl1 libglx-mesa0 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 \
          libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 \
          libxcb-shape0 libxcb-cursor0 fonts-dejavu-core

.PHONY: install install-runtime sysdeps test test-main test-runtime demo bench bench-gpu test-gpu gpu-deps clean

install: $(VENV)/.installed
install-runtime: $(RT_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[train,dev,distributed,napari,bioimageio,bench,report]"
	touch $@

# A second environment with the runtime's dependencies only — no torch at all.
$(RT_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(RT_VENV)
	$(RT_VENV)/bin/pip install -q --upgrade pip
	$(RT_VENV)/bin/pip install -q -e . pytest
	@! $(RT_VENV)/bin/python -c "import torch" 2>/dev/null || (echo "torch leaked into $(RT_VENV)"; exit 1)
	touch $@

sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		missing=$$(for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			echo "installing Debian packages for the GUI tests:" $$missing; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		fi; \
	else echo "sysdeps: not root or no apt-get — the napari and browser tests will be skipped"; fi

test: sysdeps test-main test-runtime

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

# On a CUDA machine: the GPU tests, and a benchmark of what runs there (PyTorch on the GPU; ONNX Runtime's CUDA EP
# when onnxruntime-gpu is installed). GPU_PY defaults to this checkout's venv. On the lent GPU machine (no network;
# its python3 has torch, onnx, onnxruntime without CUDA, OpenCV and typer) pass GPU_PY=python3: the package is then
# installed there without dependencies. docs/STATUS.md, "GPU sessions".
GPU_PY    ?= $(BIN)/python
GPU_OUT   ?= benchmarks/results/gpu
GPU_BENCH ?= --batch 1,8,32,128 --threads 0 --min-time 2 --no-cold-start
GPU_SETUP  = $(if $(filter $(BIN)/python,$(GPU_PY)),$(VENV)/.installed,gpu-deps)

gpu-deps:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .

test-gpu: $(GPU_SETUP)
	$(GPU_PY) -m pytest -q -m gpu -p no:cacheprovider

bench-gpu: $(GPU_SETUP)
	$(GPU_PY) -m cadbcnn_bench.cli --device cuda $(GPU_BENCH) --out $(GPU_OUT)

clean:
	rm -rf build .pytest_cache
