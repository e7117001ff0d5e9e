# Two commands a person needs:  make run  (napari with the plugin on the sample)
#                               make test (the whole test suite, under Xvfb)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; use e.g. `make test TORCH="torch==2.13.0 --index-url <url>"` for another.
TORCH ?= torch==2.13.0
XVFB := xvfb-run -a -s "-screen 0 1600x1000x24"

.PHONY: run test lint format sysdeps screenshot bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

sysdeps:
	@bash scripts/sysdeps.sh

run: sysdeps $(VENV)/.installed
	@if [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
		echo "no display found: starting napari on a virtual one (xvfb-run); nothing will be visible"; \
		$(XVFB) $(PY) -m marsviewer; \
	else \
		$(PY) -m marsviewer; \
	fi

test: sysdeps $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(XVFB) $(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .

screenshot: sysdeps $(VENV)/.installed
	$(XVFB) $(PY) docs/screenshot.py docs/screenshot.png
	$(XVFB) $(PY) docs/screenshot.py docs/training.png 45
	$(XVFB) $(PY) docs/screenshot.py docs/review.png review 3
	$(XVFB) $(PY) docs/screenshot.py docs/label_next.png label-next 60

# Every figure in docs/figures.md comes from here: bench/out/*.json (machine and date inside,
# and this run's start, so that the page can say that one run measured them all).
bench: export MARS_BENCH_RUN := $(shell date -u +%Y-%m-%dT%H:%MZ)
bench: sysdeps $(VENV)/.installed
	mkdir -p bench/out
	cd bench && ../$(PY) train_throughput.py --json out/train_throughput.json
	cd bench && ../$(PY) compile_check.py --json out/compile_check.json
	cd bench && ../$(PY) quality.py --images 600 --epochs 8 --json out/quality.json
	cd bench && ../$(PY) precision_quality.py --json out/precision_quality.json
	cd bench && ../$(PY) audit_models.py --json out/audit_models.json
	cd bench && ../$(PY) audit_quality.py --seeds 1,2,3,4,5 --json out/audit_quality.json
	cd bench && $(XVFB) ../$(PY) gui_responsiveness.py --json out/gui_responsiveness.json
	cd bench && ../$(PY) label_confidence.py --json out/label_confidence.json
	cd bench && ../$(PY) active_learning.py --json out/active_learning.json
	cd bench && $(XVFB) ../$(PY) scale.py --json out/scale.json
	cd bench && ../$(PY) crop_rate.py --json out/crop_rate.json
	$(MAKE) .venv-peer/.installed
	cd bench && ../.venv-peer/bin/python peer.py --json out/peer.json
	$(PY) bench/readme_figures.py

# The peer of bench/peer.py, with marsviewer beside it on the same torch: a venv of its own,
# since segmentation-models-pytorch brings torchvision, which needs the torch it was built for.
.venv-peer/.installed: pyproject.toml
	python3 -m venv .venv-peer
	.venv-peer/bin/python -m pip install -q --upgrade pip
	.venv-peer/bin/python -m pip install -q -e ".[peer]"
	touch $@

clean:
	rm -rf $(VENV) .venv-peer *.egg-info .pytest_cache .ruff_cache
