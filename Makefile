# Two entry points, each installing everything into ./.venv first (the CPU torch wheel, then `.[dev]`,
# which holds the `train` extra: the serving set alone is `pip install .`, without torch):
#   make demo   - the whole path (synthesise, train, export, verify, predict)
#   make test   - the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...") on a GPU box.
TORCH_SPEC ?= torch==2.13.0
# cuCIM without its CUDA wheels decodes on the CPU; on a GPU box use `pip install -e '.[gpu]'` instead.
CUCIM_SPEC ?= cucim-cu12==26.10.0
BIN := $(VENV)/bin

.PHONY: demo test bench proto clean gpu-check gpu-bundle system-tools fuzz image-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(CUCIM_SPEC)
	# lifelines, the log-rank reference of tests/test_evaluate.py, pins pandas < 3 while running fine on 3.x;
	# installed beside the rest so that it does not move the pandas every other test runs on
	$(BIN)/pip install --quiet autograd autograd-gamma formulaic
	$(BIN)/pip install --quiet --no-deps lifelines==0.30.3
	touch $@

demo: $(VENV)/.installed
	$(BIN)/histosurv demo

# System programs some tests drive (headless Chromium opens a per-case report; promtool tests the alert
# rules): installed from Debian's packages where apt-get can, else those tests skip and say why.
SYSTEM_TOOLS := chromium:chromium promtool:prometheus
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing$$missing from Debian's packages"; \
		(apt-get install -y -q$$missing >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q$$missing >/dev/null 2>&1)) \
			|| echo "could not install$$missing: the tests that need them will skip"; \
	elif [ -n "$$missing" ]; then echo "not installed:$$missing (needs apt-get as root): the tests that need them will skip"; fi

# Two pytest-xdist workers, a test file each at a time (module fixtures are built once), each with half
# the cores: much of the suite is single-threaded Python (torch.export tracing, CLI start-ups), which
# leaves a core idle in one process. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed system-tools
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

bench: $(VENV)/.installed
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/slides.py --svs "$$($(BIN)/python -c "from histosurv.data.demo_slide import demo_slide; print(demo_slide())")"
	$(BIN)/python bench/server.py
	$(BIN)/python bench/batch.py
	$(BIN)/python bench/encoders.py

# The fuzz properties of tests/test_fuzz_*.py with a large budget (the suite runs them with a small one)
FUZZ_EXAMPLES ?= 20000
fuzz: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python bench/fuzz.py --examples $(FUZZ_EXAMPLES) --server-examples 1000

# The serving image, built offline (buildah on a debootstrap base, as root) and smoke-tested over gRPC and REST:
# health, metadata, an inference, the non-root user, the health check and a SIGTERM drain (deploy/image/)
image-test: $(VENV)/.installed
	deploy/image/build.sh
	$(BIN)/python deploy/image/smoke_test.py

# On a GPU box (offline, bare): build the CUDA kernels, run the GPU tests, measure every GPU path, and write
# gpu-check.json / .md / .log into GPU_CHECK_OUT. It runs on the box's own Python and CUDA torch, never
# ./.venv, and installs nothing from a network; see bench/gpu_check.py (--dry-run lists the stages).
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	$(PYTHON) bench/gpu_check.py --out "$(GPU_CHECK_OUT)"

# On a networked machine: the wheels and the demo slide the GPU check brings along (.gpu-bundle/, ignored)
gpu-bundle: $(VENV)/.installed
	$(BIN)/python bench/gpu_bundle.py

proto: $(VENV)/.installed  # regenerate histosurv/runtime/server/_proto from proto/ (the output is committed)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache build .gpu-bundle gpu-check
