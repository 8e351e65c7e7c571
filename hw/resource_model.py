"""Analytic resource model of the pipeline stages, calibrated against Yosys.

:func:`estimate_stage` gives a stage's LUTs, flip-flops, memory bits and block-RAM blocks
for an FPGA family (``ecp5`` or ``ice40``). Logic is a first-order model per engine
(:func:`logic_features`: XNOR/add-subtract lanes, popcount and accumulator widths,
comparators, counters), scaled by per-engine, per-family factors fitted to Yosys'
mapping of real engines: per engine and family, non-negative coefficients of the model's
terms (:func:`logic_terms`) fitted by least squares (``hw/calibration.json``, written by
``python -m boards.calibrate``; ``make calibrate``). Memories are counted from the
engine's memory shapes: a memory of at most ``LUTRAM_BITS`` bits or ``LUTRAM_DEPTH``
words maps to LUT RAM or flip-flops, a larger one to the fewest block-RAM blocks over the family's width x depth
configurations (ECP5 DP16KD/PDPW16KD, iCE40 SB_RAM40_4K; iCE40 run-time-loaded weights
to 16 x 16K SPRAMs).
"""

import json
import math
from pathlib import Path

import numpy as np

from hw.arith import bits_for

CALIBRATION = Path(__file__).with_name("calibration.json")
FAMILIES = ("ecp5", "ice40")
LUTRAM_BITS = 1024   # a memory this small, or one at most LUTRAM_DEPTH deep, is not given block RAM
LUTRAM_DEPTH = 64

# block RAM configurations: (bits per block, [(width, depth), ...])
BRAM_CONFIGS = {
    "ecp5": (18432, [(1, 16384), (2, 8192), (4, 4096), (9, 2048), (18, 1024), (36, 512)]),
    "ice40": (4096, [(2, 2048), (4, 1024), (8, 512), (16, 256)]),
}
SPRAM_CONFIG = (262144, [(16, 16384)])


def _ternary_params(s):
    """``(nf, sf, in_bits, parts, part, dot, n_thr, scale_bits, param_width)`` of a zero-skip stage
    (:class:`hw.ternary_mvtu.TernaryMVTU`): a lane's partial-sum width (``part``, ``parts`` = 2
    with TTQ's separate positive and negative sums), the dot product's width from the (scaled)
    weights and the input range, and the width of a PE's per-neuron parameter word."""
    from hw.network import code_shape
    layer = s.layers[0]
    m, n = layer.weights.shape
    nf, sf = m // s.pe, n // s.simd
    act = layer.in_act
    xmax = max(abs(act.lo), abs(act.hi))
    ttq = "pos_scale" in layer.arrays
    dot = bits_for(int(np.abs(layer.int_weights).sum(axis=1).max()) * xmax) + 1
    n_thr = len(s.layers[1].arrays["thresholds"][0]) if len(s.layers) > 1 else 0
    scale_bits = bits_for(int(max(layer.arrays["pos_scale"].max(), layer.arrays["neg_scale"].max()))) if ttq else 0
    param_width = (n_thr * (dot + 1) + 1 if n_thr else 0) + 2 * scale_bits
    return (nf, sf, code_shape(act).width, 2 if ttq else 1, bits_for(sf * xmax) + 1, dot, n_thr, scale_bits,
            param_width)


def _shift_params(s):
    """``(m, n, in_bits, acc, n_thr, term_widths)`` of a shift-add stage: the accumulator from the
    codebooks (:class:`hw.shift_mvtu.ShiftMVTU`), each term's copy width ``in_bits + E - t``."""
    from models.qmd import pow2_codebook_max
    layer = s.layers[0]
    m, n = layer.weights.shape
    p = s.params
    act = layer.in_act
    xmax = max(abs(act.lo), abs(act.hi))
    in_bits = bits_for(xmax) + (1 if act.lo < 0 else 0)
    acc = bits_for(n * xmax * pow2_codebook_max(p["terms"], p["code_bits"], p["exponent_offset"])) + 1
    n_thr = len(s.layers[1].arrays["thresholds"][0]) if len(s.layers) > 1 else 0
    widths = [in_bits + max(0, p["exponent_offset"] - t) for t in range(p["terms"])]
    return m, n, in_bits, acc, n_thr, widths


def _mvtu_params(s):
    layer = s.layers[0]
    m, n = layer.weights.shape
    binary_in = s.engine == "xnor_mvtu"
    in_bits = 1 if binary_in else layer.in_act.bits
    if binary_in:
        acc = bits_for(n)
    else:
        acc = bits_for(n * max(abs(layer.in_act.lo), abs(layer.in_act.hi))) + 1
    n_thr = len(s.layers[1].arrays["thresholds"][0]) if len(s.layers) > 1 else 0
    return m, n, in_bits, acc, n_thr


def logic_terms(s):
    """First-order terms of stage ``s``'s logic: ``({term: value} for LUTs, {term: value} for
    FFs)``. The estimate is ``sum(coefficient[term] * value)``, with the coefficients of
    ``DEFAULT_COEFFICIENTS`` or, once calibrated, the fitted ones."""
    if s.engine == "shift_mvtu":
        m, n, in_bits, acc, n_thr, widths = _shift_params(s)
        folds = bits_for(m * n // (s.pe * s.simd))
        b = s.params["code_bits"]
        # per lane and term a mux tree of B-1 levels over its copy width, the complement and its
        # share of the pipelined adder tree (about B + 1 LUTs and 3 FFs a bit in Yosys' ECP5
        # mapping of a PE 4 x SIMD 8 engine); per PE as the MVTU
        return ({"term_bits": s.pe * s.simd * sum(w * (b + 1) for w in widths), "pe_acc": s.pe * acc,
                 "compare": s.pe * acc * n_thr, "counters": folds, "one": 1},
                {"term_bits": s.pe * s.simd * sum(w for w in widths), "pe_acc": s.pe * acc,
                 "pe_out": s.pe * s.out_shape.width, "input": s.simd * in_bits, "counters": folds, "one": 1})
    if s.engine == "ternary_mvtu":
        nf, sf, in_bits, parts, part, dot, n_thr, scale_bits, _ = _ternary_params(s)
        lanes = s.pe * s.simd
        ptr = bits_for(max(1, s.params["busiest_lane_slots"]))
        # per lane: the schedule pointer and bank-address adder, the select/negate and the
        # partial-sum accumulator(s); per PE: the adder tree over its lanes, the registered dot
        # product, TTQ's scale products, the comparators and the FIFO levels
        return ({"lanes": lanes * (parts * part + in_bits + 2 * ptr + 4), "reduce": lanes * parts * (part + 2),
                 "compare": s.pe * n_thr * dot, "scale": s.pe * 2 * scale_bits * part,
                 "one": 1},
                {"lanes": lanes * (parts * part + ptr + bits_for(nf) + 8),
                 "pe": s.pe * (2 * bits_for(2 * nf + 2) + bits_for(nf) + dot), "one": 1})
    if s.engine.endswith("_mvtu"):
        m, n, in_bits, acc, n_thr = _mvtu_params(s)
        folds = bits_for(m * n // (s.pe * s.simd))
        # per lane an XNOR (or a conditional negate) and its share of the adder tree;
        # per PE the accumulator adder and register, comparators, the output register
        # the pipeline registers of hw.mvtu.MVTU (pipelined): the weight and input words as
        # they leave their memories, and the partial sums of CHUNK lanes
        chunk = 16 if s.engine == "xnor_mvtu" else 4
        chunk_width = bits_for(chunk) if s.engine == "xnor_mvtu" else bits_for(chunk * (1 << in_bits)) + 1
        pipeline = s.pe * s.simd + s.simd * in_bits + s.pe * -(-s.simd // chunk) * chunk_width
        # "lut" weights: every bit of the PE*SIMD-bit word a function of the address (a LUT4
        # per 16 words, joined by the PFUMX/L6MUX muxes), plus the read port's data register.
        # A memory small or shallow enough for LUTs anyway is built so from "rom" too (Yosys maps
        # it identically; the calibrated lane terms cover it), so only a deeper one adds logic
        width, depth = s.pe * s.simd, m * n // (s.pe * s.simd)
        lut_rom = width * -(-depth // 16) if s.weights == "lut" and takes_block_ram(width, depth) else 0
        return ({"lanes": s.pe * s.simd * in_bits, "pe_acc": s.pe * acc, "compare": s.pe * acc * n_thr,
                 "counters": folds, "lut_rom": lut_rom, "one": 1},
                {"pe_acc": s.pe * acc, "pe_out": s.pe * s.out_shape.width, "input": s.simd * in_bits,
                 "pipeline": pipeline, "counters": folds, "lut_rom": s.pe * s.simd if lut_rom else 0, "one": 1})
    lanes = max(s.in_lanes, s.out_lanes)
    width = s.out_shape.width if s.out_shape is not None else 8
    if s.engine == "threshold_unit":
        t = len(s.layers[0].arrays["thresholds"][0])
        luts, ffs = lanes * t * s.layers[0].in_act.bits // 2, lanes * width
    elif s.engine == "sliding_window":
        p = s.params
        depth = (2 * p["kernel"] + p["stride"]) * p["width"] * p["channels"] // lanes
        luts, ffs = lanes * width + 8 * bits_for(depth), lanes * width + 6 * bits_for(depth)
    elif s.engine == "maxpool":
        luts, ffs = 2 * lanes * width, 2 * lanes * width
    elif s.engine == "width_converter":
        luts, ffs = lanes * width, 2 * lanes * width
    elif s.engine == "argmax_output":
        c, w = s.params["classes"], s.params["logit_shape"].width
        luts, ffs = s.in_lanes * 2 * w + c * w // 2, 2 * c * w
    else:
        raise ValueError(f"no resource model for engine {s.engine!r}")
    return {"model": luts, "one": 1}, {"model": ffs, "one": 1}


DEFAULT_COEFFICIENTS = {
    "mvtu": ({"lanes": 2, "pe_acc": 2, "compare": 1, "counters": 4, "lut_rom": 1.25, "one": 0},
             {"pe_acc": 1, "pe_out": 1, "input": 1, "pipeline": 1, "counters": 3, "lut_rom": 1, "one": 0}),
    "ternary_mvtu": ({"lanes": 1, "reduce": 1, "compare": 1, "scale": 1, "one": 0},
                     {"lanes": 1, "pe": 1, "one": 16}),
    "shift_mvtu": ({"term_bits": 1, "pe_acc": 2, "compare": 1, "counters": 4, "one": 0},
                   {"term_bits": 3, "pe_acc": 1, "pe_out": 1, "input": 1, "counters": 3, "one": 0}),
    "other": ({"model": 1, "one": 0}, {"model": 1, "one": 0}),
}


def default_coefficients_key(engine):
    """The ``DEFAULT_COEFFICIENTS`` entry of ``engine``."""
    if engine in DEFAULT_COEFFICIENTS:
        return engine
    return "mvtu" if engine.endswith("_mvtu") else "other"


def _apply(coef, terms):
    return sum(coef.get(k, 0.0) * v for k, v in terms.items())


def logic_features(s):
    """The uncalibrated first-order (LUTs, FFs) of stage ``s``."""
    lt, ft = logic_terms(s)
    dl, df = DEFAULT_COEFFICIENTS[default_coefficients_key(s.engine)]
    return round(_apply(dl, lt)), round(_apply(df, ft))


def memories(s):
    """``[(name, width, depth, kind)]`` of the memories in stage ``s``; kind is ``rom``
    (initialised weights/thresholds), ``ram`` (run-time loaded weights) or ``buffer``."""
    if s.engine == "ternary_mvtu":
        nf, sf, in_bits, parts, part, _, _, _, param_width = _ternary_params(s)
        lanes, fifo_depth = s.pe * s.simd, 2 * nf + 2
        # every lane its own schedule memory (as deep as its slots), its own copy of its input
        # bank (a read port of its own) and its partial-sum FIFO (as deep as costs no cycle);
        # per PE an output FIFO and the parameter memory
        mems = [("weights", s.params["slot_bits"], int(d), "rom") for row in s.params["lane_slots"] for d in row if d]
        mems += [("input", in_bits, 2 * sf, "buffer")] * lanes
        mems += [("fifo", parts * part, s.params["lane_fifo_depth"], "buffer")] * lanes
        mems += [("fifo", s.out_shape.width, fifo_depth, "buffer")] * s.pe
        if param_width:
            mems += [("thresholds", param_width, nf, "rom")] * s.pe
        return mems
    if s.engine == "shift_mvtu":
        m, n, in_bits, acc, n_thr, _ = _shift_params(s)
        nf, sf = m // s.pe, n // s.simd
        out = s.layers[0].out_act
        mems = [("weights", s.pe * s.simd * s.params["terms"] * s.params["code_bits"], nf * sf,
                 s.params.get("weights", "rom")),
                ("input", s.simd * in_bits, 2 * sf, "buffer")]
        if n_thr:
            thr_w = bits_for(max(abs(out.lo), abs(out.hi)) + 1) + 1
            mems.append(("thresholds", s.pe * (n_thr * thr_w + 1), nf, "rom"))
        return mems
    if s.engine.endswith("_mvtu"):
        m, n, in_bits, acc, n_thr = _mvtu_params(s)
        nf, sf = m // s.pe, n // s.simd
        mems = [("weights", s.pe * s.simd, nf * sf, s.weights or "rom"),
                ("input", s.simd * in_bits, 2 * sf, "buffer")]
        if n_thr:
            thr_w = bits_for(n + 1) + 1
            mems.append(("thresholds", s.pe * (n_thr * thr_w + 1), nf, "rom"))
        return mems
    if s.engine == "sliding_window":
        p = s.params
        rows = 2 * p["kernel"] + p["stride"]
        return [("lines", s.in_lanes * s.out_shape.width, rows * p["width"] * p["channels"] // s.in_lanes, "buffer")]
    if s.engine == "maxpool":
        p = s.params
        return [("partial", s.in_lanes * s.out_shape.width, (p["width"] // p["kernel"]) * p["channels"] // s.in_lanes,
                 "buffer")]
    return []


def takes_block_ram(width, depth):
    """Whether Yosys gives an initialised ``width x depth`` memory block RAM (else LUTs/FFs)."""
    return width * depth > LUTRAM_BITS and depth > LUTRAM_DEPTH


def bram_blocks(width, depth, family, kind="rom"):
    """Block-RAM blocks for one ``width x depth`` memory (0 if it goes to LUT RAM/FFs);
    returns ``(blocks, bits per block)``."""
    bits, configs = SPRAM_CONFIG if (kind == "ram" and family == "ice40") else BRAM_CONFIGS[family]
    if kind == "lut":             # built from LUTs (rom_style = "logic"): counted in the logic terms
        return 0, bits
    if not takes_block_ram(width, depth) and kind != "ram":
        return 0, bits
    return min(math.ceil(width / w) * math.ceil(depth / d) for w, d in configs), bits


def load_calibration(path=CALIBRATION):
    """The fitted coefficients ``{family: {engine: {"luts": {term: c}, "ffs": {term: c}}}}``
    ({} if absent)."""
    path = Path(path)
    return json.loads(path.read_text())["factors"] if path.is_file() else {}


_CAL = None


def _calibration():
    global _CAL
    if _CAL is None:
        _CAL = load_calibration()
    return _CAL


def register_slice_cost(s):
    """``(LUTs, FFs)`` of the register slice on stage ``s``'s output stream
    (:class:`hw.register_slice.StreamRegisterSlice`): two payload registers and two valid bits,
    and a 2:1 multiplexer per payload bit in front of the output register. On the CNV's nine
    slices (114 payload bits) Yosys' ECP5 mapping added 244 FFs (this counts 246) and 94 LUTs
    (this counts 114: some multiplexers merge into the register's enable logic)."""
    width = s.out_lanes * s.out_shape.width
    return width, 2 * width + 2


def estimate_stage(s, family="ecp5", calibration=None):
    """Estimated resources of stage ``s`` on ``family`` (an output register slice included):
    ``luts``, ``ffs``, ``weight_bits``,
    ``buffer_bits``, ``bram_blocks``, ``bram_bits`` (capacity of those blocks), ``spram_blocks``
    and ``calibrated`` (whether fitted factors were applied)."""
    cal = (_calibration() if calibration is None else calibration).get(family, {}).get(s.engine)
    if cal:
        # a term the calibration has not seen (added to the model since) keeps its default coefficient
        lt, ft = logic_terms(s)
        dl, df = DEFAULT_COEFFICIENTS[default_coefficients_key(s.engine)]
        luts, ffs = _apply(dl | cal["luts"], lt), _apply(df | cal["ffs"], ft)
    else:
        luts, ffs = logic_features(s)
    if s.register_output:
        slice_luts, slice_ffs = register_slice_cost(s)
        luts, ffs = luts + slice_luts, ffs + slice_ffs
    weight_bits = buffer_bits = blocks = spram = bram_bits = 0
    for name, width, depth, kind in memories(s):
        if name == "weights":
            weight_bits += width * depth
        else:
            buffer_bits += width * depth
        n, bits = bram_blocks(width, depth, family, kind)
        if kind == "ram" and family == "ice40":
            spram += n
        else:
            blocks += n
        bram_bits += n * bits
    est = {"luts": max(0, round(luts)), "ffs": max(0, round(ffs)), "weight_bits": weight_bits,
           "buffer_bits": buffer_bits, "bram_blocks": blocks, "spram_blocks": spram, "bram_bits": bram_bits,
           "calibrated": bool(cal)}
    if s.engine == "ternary_mvtu":
        m, n = s.layers[0].weights.shape
        est["weight_bits_dense"] = 2 * m * n        # what 2-bit dense weights would take
    return est
