# qnnfab — every target is a thin layer over `python -m qnnfab <command>`.
# The first target run creates .venv from the pinned requirements.txt.

PYTHON ?= python3
VENV   ?= .venv
MODEL  ?= bnn_mnist
IMAGES ?= 100
STALL  ?= 0
EPOCHS ?=
DEVICE ?= cpu
COMPILE ?=
BOARD  ?= ulx3s-85f
TARGET_FPS ?=
CLOCK_MHZ ?= 100
DEVICE_BUDGET ?=
SYNTH_COSTS ?=
TARGET_MHZ ?=

STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
PY    := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: help venv verilog sim sim-full eval check synth fold calibrate bench train export test clean

help:
	@echo "make sim MODEL=bnn_mnist [IMAGES=100]  generate, simulate in Verilator on real test images, report"
	@echo "make verilog MODEL=m [SYNTH_COSTS=1]    Verilog + report in build/m/ (SYNTH_COSTS: Yosys multipliers/LUTs per MAC of shift engines)"
	@echo "make sim-full MODEL=m                   the whole test set through the RTL (C++ Verilator harness)"
	@echo "make eval MODEL=m                       integer reference accuracy on the full test set"
	@echo "make check MODEL=m                      validate the model description and folding"
	@echo "make synth MODEL=m BOARD=b              Yosys + nextpnr (+ bitstream): build/m/synth-b.json/.md/.svg"
	@echo "                                          b: icebreaker ulx3s-85f orangecrab-25f ooc-up5k ooc-25f ooc-85f"
	@echo "make fold MODEL=m TARGET_FPS=f [CLOCK_MHZ=100] | DEVICE_BUDGET=85f   automatic PE/SIMD folding"
	@echo "make calibrate                          refit the resource model against Yosys (hw/calibration.json)"
	@echo "make bench                              synthesize every shipped model for its boards: build/bench/"
	@echo "make train MODEL=m [EPOCHS=n] [DEVICE=cuda] [COMPILE=1]  quantization-aware training (resumable)"
	@echo "make export MODEL=m                     export the trained model to models/zoo/m"
	@echo "make test                               the test suite"

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

verilog: $(STAMP)
	$(PY) -m qnnfab verilog --model $(MODEL) $(if $(SYNTH_COSTS),--synth-costs)

sim: $(STAMP)
	$(PY) -m qnnfab verilog --model $(MODEL)
	$(PY) -m qnnfab sim --model $(MODEL) --images $(IMAGES) --stall $(STALL)

sim-full: $(STAMP)
	$(PY) -m qnnfab sim-full --model $(MODEL)

eval: $(STAMP)
	$(PY) -m qnnfab eval --model $(MODEL)

check: $(STAMP)
	$(PY) -m qnnfab check --model $(MODEL)

synth: $(STAMP)
	$(PY) -m qnnfab synth --model $(MODEL) --board $(BOARD) $(if $(TARGET_MHZ),--target-mhz $(TARGET_MHZ))

fold: $(STAMP)
	$(PY) -m qnnfab fold --model $(MODEL) $(if $(TARGET_FPS),--fps $(TARGET_FPS) --clock-mhz $(CLOCK_MHZ)) $(if $(DEVICE_BUDGET),--device $(DEVICE_BUDGET)) $(if $(REGISTER_OUTPUTS),--register-outputs $(REGISTER_OUTPUTS))

calibrate: $(STAMP)
	$(PY) -m boards.calibrate

bench: $(STAMP)
	$(PY) -m boards.bench

train: $(STAMP)
	$(PY) -m qnnfab train --model $(MODEL) --device $(DEVICE) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(COMPILE),--compile)

export: $(STAMP)
	$(PY) -m qnnfab export --model $(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf build
