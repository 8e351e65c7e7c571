"""cocotb test bench for a generated accelerator (runs inside Verilator).

It only drives and records; the comparison with the reference happens outside, in
:mod:`sim.rtl`, on the integers this bench writes. Configuration comes from the JSON
file named by ``$QNNFAB_BENCH``:

* ``stimulus``: npz with ``pixels`` [frames, beats, lanes] (the input stream) and, for a
  design with run-time loaded weights, ``weights`` (the byte image for the ``weights``
  stream, driven from the first cycle alongside the pixels, with the same stalls),
* ``taps``: for each inner stream ``{"name", "width", "lanes", "signed"}``,
* ``result``: ``{"classes", "cls_width", "logit_width"}``,
* ``in_stall`` / ``out_stall``: probabilities of holding valid / ready low on a cycle,
* ``captured``: where to write what was seen.

Per cycle: at the rising edge the inputs for the new cycle are written; at ReadOnly
(all logic settled, the values the next edge samples) every stream with ``valid &
ready`` is recorded. A transfer therefore counts exactly when the hardware takes it.
"""

import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge


def _unpack(word, width, count, signed):
    mask = (1 << width) - 1
    vals = [(word >> (k * width)) & mask for k in range(count)]
    if signed:
        vals = [v - (1 << width) if v >> (width - 1) else v for v in vals]
    return vals


def _pack(elems, width):
    mask, word = (1 << width) - 1, 0
    for k, e in enumerate(elems):
        word |= (int(e) & mask) << (k * width)
    return word


@cocotb.test()
async def stream_frames(dut):
    with open(os.environ["QNNFAB_BENCH"]) as f:
        cfg = json.load(f)
    pixels = np.load(cfg["stimulus"])["pixels"]
    frames, beats_per_frame, lanes = pixels.shape
    in_width = cfg["pixel_width"]
    beats = [_pack(pixels[f, b], in_width) for f in range(frames) for b in range(beats_per_frame)]
    rng = random.Random(cfg.get("seed", 0))
    in_stall, out_stall = cfg.get("in_stall", 0.0), cfg.get("out_stall", 0.0)

    taps = [(t, getattr(dut, f"tap_{t['name']}__valid"), getattr(dut, f"tap_{t['name']}__ready"),
             getattr(dut, f"tap_{t['name']}__payload")) for t in cfg["taps"]]
    seen = {t["name"]: [] for t in cfg["taps"]}
    seen_cycles = {t["name"]: [] for t in cfg["taps"]}
    res = cfg["result"]
    classes, cls_w, logit_w = res["classes"], res["cls_width"], res["logit_width"]
    result_cls, result_logits, result_cycles = [], [], []

    Clock(dut.clk, 10, unit="ns").start()
    stim = np.load(cfg["stimulus"])
    wbytes = [int(b) for b in stim["weights"]] if "weights" in stim.files else []
    dut.rst.value = 1
    dut.pixels__valid.value = 0
    dut.result__ready.value = 0
    if wbytes:
        dut.weights__valid.value = 0
        dut.weights_reload.value = 0
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    wnext, weights_cycle = 0, None

    nxt, cycle = 0, 0
    limit = cfg.get("max_cycles", 100000 + 100 * len(beats) * max(1, cfg.get("cycles_per_beat", 1)))
    while len(result_cls) < frames:
        await RisingEdge(dut.clk)
        cycle += 1
        if cycle > limit:
            raise AssertionError(f"timeout: {len(result_cls)} of {frames} results after {cycle} cycles")
        drive = nxt < len(beats) and rng.random() >= in_stall
        dut.pixels__valid.value = int(drive)
        if drive:
            dut.pixels__payload.value = beats[nxt]
        ready = int(rng.random() >= out_stall)
        dut.result__ready.value = ready
        wdrive = wnext < len(wbytes) and rng.random() >= in_stall
        if wbytes:
            dut.weights__valid.value = int(wdrive)
            if wdrive:
                dut.weights__payload.value = wbytes[wnext]
        await ReadOnly()
        if drive and dut.pixels__ready.value:
            nxt += 1
        if wdrive and dut.weights__ready.value:
            wnext += 1
            if wnext == len(wbytes):
                weights_cycle = cycle
        for t, valid, tready, payload in taps:
            if valid.value and tready.value:
                seen[t["name"]].extend(_unpack(int(payload.value), t["width"], t["lanes"], t["signed"]))
                seen_cycles[t["name"]].append(cycle)
        if ready and dut.result__valid.value:
            word = int(dut.result__payload.value)
            result_cls.append(word & ((1 << cls_w) - 1))
            result_logits.append(_unpack(word >> cls_w, logit_w, classes, True))
            result_cycles.append(cycle)

    out = {"weights_cycle": np.array(-1 if weights_cycle is None else weights_cycle, dtype=np.int64),
           "cls": np.array(result_cls, dtype=np.int64),
           "logits": np.array(result_logits, dtype=np.int64).reshape(frames, classes),
           "result_cycles": np.array(result_cycles, dtype=np.int64)}
    for name in seen:
        out[f"tap.{name}"] = np.array(seen[name], dtype=np.int64)
        out[f"tap_cycles.{name}"] = np.array(seen_cycles[name], dtype=np.int64)
    np.savez(cfg["captured"], **out)
