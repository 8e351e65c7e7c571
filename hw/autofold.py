"""Automatic folding: choose PE and SIMD for every layer from a throughput target or a
device budget.

* :func:`fold_for_cycles` — given a frame interval ``T`` (cycles), every folded layer gets
  the least parallelism (smallest ``PE*SIMD``; then SIMD at most ``SIMD_CAP`` so adder
  trees stay shallow; then the fewest accumulators, i.e. the widest such SIMD) whose
  cycles per frame ``windows * (M/PE) * (N/SIMD)`` are at most ``T``: no layer is folded
  wider than it needs. Candidates respect the hardware's rules (``PE | M``, ``SIMD | N``,
  ``SIMD | Cin`` for a convolution, and a layer's ``SIMD`` and the previous engine's ``PE``
  dividing one another so a width converter can join them).
* :func:`fold_for_fps` — ``T = floor(clock / fps)``.
* :func:`fold_for_budget` — the smallest ``T`` whose folding fits a device: estimated LUTs
  (calibrated model, :mod:`hw.resource_model`) within ``utilization`` of the device's and
  block RAM (EBR, and SPRAM for run-time-loaded weights) within its blocks. A binary
  search over ``T`` for each choice of layers whose weights go to SPRAM (none, or the
  largest ones, on an iCE40 UltraPlus); the result is checked with
  :func:`hw.network.plan_network`.
"""

import math

import numpy as np

from hw.network import frame_cycles, plan_network
from hw.resource_model import estimate_stage
from qnnfab.errors import QnnfabError

FOLDED = ("dense", "conv2d")
SIMD_CAP = 64   # wider SIMD means a deeper popcount/adder tree per cycle: prefer PE beyond this
SPRAM_WORDS = 16384


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _windows(layer):
    return int(np.prod(layer.out_shape[:2])) if layer.kind == "conv2d" else 1


def _compatible(a, b):
    return a % b == 0 or b % a == 0


def layer_cycles(layer, pe, simd):
    m, n = layer.weights.shape
    return _windows(layer) * (m // pe) * (n // simd)


def _candidates(layer, prev_pe):
    m, n = layer.weights.shape
    simds = _divisors(n)
    if layer.kind == "conv2d":
        simds = [s for s in simds if layer.in_shape[2] % s == 0]
    if prev_pe is not None:
        simds = [s for s in simds if _compatible(s, prev_pe)]
    return [(pe, s) for pe in _divisors(m) for s in simds]


def _lut_cost(layer, pe, simd):
    m, n = layer.weights.shape
    in_bits = 1 if layer.in_act.kind == "binary" else layer.in_act.bits
    return pe * simd * in_bits * 2 + pe * math.ceil(math.log2(n + 1)) * 3


def fold_for_cycles(qmd, target, ram=(), register_output=False):
    """The least-parallel folding whose every layer takes at most ``target`` cycles per frame
    (a layer that cannot reach it gets its fastest folding). Layers named in ``ram`` get
    run-time loaded weights (``"weights": "ram"``, SPRAM on an iCE40 UltraPlus) and at least
    the parallelism that keeps their weight memory within one SPRAM's 16K words;
    ``register_output`` puts a register slice on every layer's output stream."""
    if target < 1:
        raise QnnfabError(f"target frame interval must be at least 1 cycle, got {target}")
    folding, prev_pe = {}, None
    for layer in qmd.layers:
        if layer.kind not in FOLDED:
            continue
        cands = _candidates(layer, prev_pe)
        if layer.name in ram:
            m, n = layer.weights.shape
            cands = [c for c in cands if m * n // (c[0] * c[1]) <= SPRAM_WORDS] or cands
        ok = [c for c in cands if layer_cycles(layer, *c) <= target]
        if ok:
            pe, simd = min(ok, key=lambda c: (c[0] * c[1], c[1] > SIMD_CAP, _lut_cost(layer, *c), c[0]))
        else:
            pe, simd = min(cands, key=lambda c: (layer_cycles(layer, *c), c[0] * c[1]))
        folding[layer.name] = {"pe": pe, "simd": simd}
        if layer.name in ram:
            folding[layer.name]["weights"] = "ram"
        if register_output:
            folding[layer.name]["register_output"] = True
        prev_pe = pe
    return folding


def fold_for_fps(qmd, fps, clock_mhz, register_output=False):
    """Folding for ``fps`` frames per second at ``clock_mhz``."""
    if fps <= 0 or clock_mhz <= 0:
        raise QnnfabError(f"TARGET_FPS and CLOCK_MHZ must be positive, got {fps} and {clock_mhz}")
    return fold_for_cycles(qmd, int(clock_mhz * 1e6 // fps), register_output=register_output)


def estimate_totals(qmd, folding, family):
    """Summed estimates of all stages of ``qmd`` folded by ``folding`` on ``family``."""
    stages = plan_network(qmd, folding)
    tot = {"luts": 0, "ffs": 0, "bram_blocks": 0, "spram_blocks": 0}
    for s in stages:
        e = estimate_stage(s, family)
        for k in tot:
            tot[k] += e[k]
    tot["cycles_per_frame"] = frame_cycles(stages)
    return tot


def fits(totals, device, utilization):
    return (totals["luts"] <= utilization * device.luts and totals["bram_blocks"] <= device.ebr_blocks
            and totals["spram_blocks"] <= device.spram_blocks)


def _ram_choices(qmd, device):
    """Sets of layers to give run-time (SPRAM) weights: none, then the 1, 2, ... largest
    binary-weight layers (only on a device with SPRAM)."""
    if not device.spram_blocks:
        return [()]
    layers = sorted((l for l in qmd.layers if l.kind in FOLDED and l.attrs.get("weight") == "binary"),
                    key=lambda l: -l.weights.size)
    return [tuple(l.name for l in layers[:k]) for k in range(len(layers) + 1)]


def _fastest_fitting(qmd, device, utilization, ram, register_output):
    family = device.family
    slowest = fold_for_cycles(qmd, 1 << 62, ram, register_output)
    if not fits(estimate_totals(qmd, slowest, family), device, utilization):
        return None
    lo = frame_cycles(plan_network(qmd, fold_for_cycles(qmd, 1, ram)))
    hi = frame_cycles(plan_network(qmd, slowest))
    while lo < hi:              # smallest feasible frame interval
        mid = (lo + hi) // 2
        if fits(estimate_totals(qmd, fold_for_cycles(qmd, mid, ram, register_output), family), device, utilization):
            hi = mid
        else:
            lo = mid + 1
    return fold_for_cycles(qmd, hi, ram, register_output)


def fold_for_budget(qmd, device, utilization=0.8, register_output=False):
    """The fastest folding whose estimate fits ``device`` (a :class:`boards.targets.Device`),
    over the choices of which layers keep their weights in SPRAM (iCE40 UltraPlus);
    ``register_output``: a register slice on every layer's output (counted in the estimate)."""
    best = None
    for ram in _ram_choices(qmd, device):
        f = _fastest_fitting(qmd, device, utilization, ram, register_output)
        if f is not None:
            cyc = frame_cycles(plan_network(qmd, f))
            if best is None or cyc < best[0]:
                best = (cyc, f)
    if best is None:
        t = estimate_totals(qmd, fold_for_cycles(qmd, 1 << 62, register_output=register_output), device.family)
        raise QnnfabError(f"model '{qmd.name}' does not fit the {device.part} even fully folded: estimated "
                          f"{t['luts']:,} LUTs (budget {int(utilization * device.luts):,}), {t['bram_blocks']} EBR "
                          f"blocks (of {device.ebr_blocks})"
                          + (f", with or without SPRAM weights" if device.spram_blocks else ""), where="device")
    return best[1]
