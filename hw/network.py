"""Compose a QMD and a folding into one streaming dataflow accelerator.

:func:`plan_network` maps the QMD's layers onto hardware stages (a ``dense`` layer and
the ``threshold`` after it fuse into one MVTU — the zero-skip :class:`TernaryMVTU` for
ternary weights; width converters join stages whose beat widths differ) and computes each
stage's cycles per frame (for a ternary engine exactly, from its weight pattern). :class:`Accelerator` is
the Amaranth component built from that plan.

Top-level stream interface
  ``pixels``: ``L`` input integers per beat (the first engine's SIMD), the frame's
  channels-last tensor in row-major order.
  ``result``: one beat per frame, ``{"cls", "logits"}`` (see :mod:`hw.argmax_output`).
  ``tap_<stage>`` (with ``taps=True``): read-only copies of each inner stream's
  ``valid``/``ready``/``payload``, so a test bench can compare every layer's output.

Run-time weights (only when some layer's folding says ``"weights": "ram"``)
  ``weights``: ``In``, one byte per beat: the byte image of :func:`weight_image` (each
  loaded engine in network order, its words in memory order, each word
  ``ceil(PE*SIMD/8)`` little-endian bytes), distributed by :class:`hw.weight_loader.WeightLoader`.
  ``weights_loaded``: ``Out(1)``, every loaded engine holds all its words. Until then the
  loaded engines compute nothing, so frames wait (no wrong result ever leaves).
  ``weights_reload``: ``In(1)``, a one-cycle pulse that forgets the loaded weights and
  restarts the load at byte 0; only while no frame is in the pipeline.
"""

from dataclasses import dataclass, field

import numpy as np
from amaranth.hdl import Module, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.argmax_output import ArgmaxOutput, result_layout
from hw.arith import bits_for
from hw.maxpool import MaxPool
from hw.mvtu import MVTU
from hw.register_slice import StreamRegisterSlice
from hw.shift_mvtu import ShiftMVTU
from hw.sliding_window import SlidingWindow
from hw.ternary_mvtu import TernaryMVTU, ternary_schedule
from hw.threshold_unit import ThresholdUnit
from hw.weight_loader import WeightLoader, word_bytes
from hw.width_converter import StreamWidthConverter
from qnnfab.errors import QnnfabError


@dataclass
class Stage:
    """One hardware stage of the pipeline and what it produces per frame."""

    name: str                 # the (first) QMD layer it implements, or dwc_<a>_<b> for a converter
    engine: str               # threshold_unit | xnor_mvtu | addsub_mvtu | ternary_mvtu | shift_mvtu | sliding_window
                              # | maxpool | width_converter | argmax_output
    layers: list              # the QMD layers it implements (empty for a width converter)
    in_lanes: int
    out_lanes: int
    out_elems: int            # output elements per frame
    out_shape: object         # Amaranth shape of one output element
    out_act: object = None    # models.qmd.Act of the output (None for the final result)
    cycles_per_frame: int = 0
    pe: int = None
    simd: int = None
    params: dict = field(default_factory=dict)
    carries: str = None       # for stages that implement no layer: the layer whose values they carry
    weights: str = None       # MVTU stages: "rom" (initialised), "lut" (initialised, LUT logic) or "ram" (loaded)
    register_output: bool = False  # MVTU stages: a register slice on the output stream (folding "register_output")

    @property
    def kind(self):
        """The QMD layer kind it implements (or the engine, for helper stages)."""
        return self.layers[0].kind if self.layers else self.engine

    @property
    def compared_layer(self):
        """The QMD layer whose reference output this stage's stream must equal."""
        return self.layers[-1] if self.layers else None


def code_shape(act):
    """Shape of an element's hardware code (binary and ternary codes are unsigned)."""
    if act.kind in ("binary", "ternary", "sint"):
        return unsigned(act.bits)
    return unsigned(act.bits) if act.lo >= 0 else signed(act.bits)


def _unsupported(qmd, layer, what):
    where = str(qmd.path / "qmd.json") if qmd.path else qmd.name
    raise QnnfabError(f"layer '{layer.name}': {what}", where=where)


def plan_network(qmd, folding):
    """Return the list of :class:`Stage` for ``qmd`` folded by ``folding``."""
    layers = qmd.layers
    if layers[-1].kind != "argmax":
        _unsupported(qmd, layers[-1], "the last layer must be 'argmax' (the accelerator outputs a class)")
    stages = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        elems = int(np.prod(layer.out_shape)) if layer.out_shape else 1
        if layer.kind == "threshold":
            if layer.in_act.code != (1, 0):
                _unsupported(qmd, layer, f"the threshold unit compares integer values, not {layer.in_act.kind} codes; "
                             "a threshold must follow the input or a dense/conv2d layer")
            stages.append(Stage(layer.name, "threshold_unit", [layer], None, None, elems,
                                unsigned(bits_for(len(layer.arrays["thresholds"][0]))), layer.out_act))
            i += 1
        elif layer.kind in ("dense", "conv2d"):
            f = folding[layer.name]
            pe, simd = f["pe"], f["simd"]
            m, n = layer.weights.shape
            binary_in = layer.in_act.kind == "binary"
            ternary_w = layer.attrs["weight"] == "ternary"
            pow2_w = layer.attrs["weight"] == "pow2"
            if layer.kind == "conv2d":
                h, w, c = layer.in_shape
                if c % simd:
                    where = str(qmd.path / "folding.json") if qmd.path else "folding"
                    raise QnnfabError(f"layer '{layer.name}' field 'simd': the sliding window reads one channel "
                                      f"block per cycle, so SIMD={simd} must divide the {c} input channels",
                                      where=where)
                a = layer.attrs
                pad = a.get("pad_value", -1 if binary_in else 0)
                swg = Stage(f"swg_{layer.name}", "sliding_window", [], simd, simd, 0,
                            code_shape(layer.in_act), layer.in_act,
                            params={"height": h, "width": w, "channels": c, "kernel": a["kernel"],
                                    "stride": a["stride"], "padding": a["padding"],
                                    "pad_value": int(layer.in_act.encode(pad))})
                oh, ow, _ = layer.out_shape
                windows = oh * ow
                swg.out_elems = windows * n
                swg.cycles_per_frame = max(windows * n, h * w * c) // simd
                swg.carries = layer.name   # the conv whose input windows it emits
                stages.append(swg)
            else:
                windows = 1
            fused = [layer]
            if nxt is not None and nxt.kind == "threshold":
                fused.append(nxt)
                out_act = nxt.out_act
                out_shape = unsigned(bits_for(len(nxt.arrays["thresholds"][0])))
            else:
                out_act = layer.out_act
                out_shape = signed(bits_for(max(abs(out_act.lo), abs(out_act.hi))) + 1)
            dense_cycles = windows * (m // pe) * (n // simd)
            storage = f.get("weights", "rom")
            if storage != "rom" and (ternary_w or pow2_w):
                where = str(qmd.path / "folding.json") if qmd.path else "folding"
                engine = "zero-skip ternary" if ternary_w else "shift-add"
                raise QnnfabError(f"layer '{layer.name}' field 'weights': {storage!r} weights are supported for "
                                  f"binary weights only; the {engine} engine keeps its weights in ROM", where=where)
            if ternary_w:
                sched = ternary_schedule(layer.weights, pe, simd)
                stages.append(Stage(layer.name, "ternary_mvtu", fused, simd, pe, windows * m, out_shape, out_act,
                                    cycles_per_frame=windows * sched.cycles_per_vector, pe=pe, simd=simd,
                                    params={"weight_density": sched.density, "cycles_per_frame_dense": dense_cycles,
                                            "schedule_bits": sched.schedule_bits, "slot_bits": sched.slot_bits,
                                            "lane_slots": sched.lane_steps.tolist(),
                                            "busiest_lane_slots": int(sched.lane_steps.max()),
                                            "lane_fifo_depth": sched.lane_fifo_depth()},
                                    weights="rom"))
            elif pow2_w:
                a = layer.attrs
                stages.append(Stage(layer.name, "shift_mvtu", fused, simd, pe, windows * m, out_shape, out_act,
                                    cycles_per_frame=dense_cycles, pe=pe, simd=simd,
                                    params={"terms": a["terms"], "code_bits": a["code_bits"],
                                            "exponent_offset": a["exponent_offset"]},
                                    weights="rom"))
            else:
                stages.append(Stage(layer.name, "xnor_mvtu" if binary_in else "addsub_mvtu", fused, simd, pe,
                                    windows * m, out_shape, out_act, cycles_per_frame=dense_cycles, pe=pe, simd=simd,
                                    weights=storage))
            stages[-1].register_output = bool(f.get("register_output"))
            i += len(fused)
        elif layer.kind == "maxpool":
            prev = stages[-1] if stages else None
            if prev is None or layer.in_act.kind not in ("binary", "ternary", "uint", "sint"):
                _unsupported(qmd, layer,
                             "max-pool needs binary, ternary, uint or sint activations from a previous stage")
            if layer.attrs["stride"] != layer.attrs["kernel"]:
                _unsupported(qmd, layer, "the max-pool engine supports stride == kernel only")
            h, w, c = layer.in_shape
            stages.append(Stage(layer.name, "maxpool", [layer], prev.out_lanes, prev.out_lanes, elems,
                                prev.out_shape, layer.out_act, cycles_per_frame=h * w * c // prev.out_lanes,
                                params={"height": h, "width": w, "channels": c, "kernel": layer.attrs["kernel"]}))
            i += 1
        elif layer.kind == "argmax":
            prev = stages[-1] if stages else None
            if prev is None or not prev.engine.endswith("_mvtu") or prev.out_act.kind != "int":
                _unsupported(qmd, layer, "argmax must follow a dense layer that outputs integer logits")
            classes = layer.in_shape[0]
            stages.append(Stage(layer.name, "argmax_output", [layer], prev.out_lanes, 1, 1, None, None,
                                cycles_per_frame=classes // prev.out_lanes,
                                params={"classes": classes, "logit_shape": prev.out_shape}))
            i += 1
        else:  # the QMD loader admits no other kind; this guards future kinds without an engine
            _unsupported(qmd, layer, f"layer kind '{layer.kind}' has no hardware engine")

    # threshold units take the width of their consumer; the first stage sets the input width
    for k in range(len(stages) - 1, -1, -1):
        s = stages[k]
        if s.engine == "threshold_unit":
            lanes = stages[k + 1].in_lanes if k + 1 < len(stages) else 1
            channels = len(s.layers[0].arrays["thresholds"])
            if channels % lanes and lanes % channels:
                _unsupported(qmd, s.layers[0], f"{channels} channels and the consumer's {lanes} lanes per beat "
                             "must divide one another")
            s.in_lanes = s.out_lanes = lanes
            s.cycles_per_frame = s.out_elems // lanes

    # join stages of different widths
    joined = [stages[0]]
    for s in stages[1:]:
        prev = joined[-1]
        if prev.out_lanes != s.in_lanes:
            a, b = prev.out_lanes, s.in_lanes
            if a % b and b % a:
                where = str(qmd.path / "folding.json") if qmd.path else "folding"
                raise QnnfabError(f"layer '{s.layers[0].name}' field 'simd': SIMD={b} and the previous stage's "
                                  f"{a} elements per beat must divide one another", where=where)
            joined.append(Stage(f"dwc_{prev.name}_{s.name}", "width_converter", [], a, b, prev.out_elems,
                                prev.out_shape, prev.out_act,
                                cycles_per_frame=max(prev.out_elems // a, prev.out_elems // b),
                                carries=prev.compared_layer.name if prev.compared_layer else prev.carries))
        joined.append(s)
    return joined


def frame_cycles(stages):
    """Analytic cycles per frame of the pipeline: its slowest stage."""
    return max(s.cycles_per_frame for s in stages)


def loaded_stages(stages):
    """The stages whose weights are loaded at run time, in network (= load) order."""
    return [s for s in stages if s.weights == "ram"]


def stage_weight_layout(s):
    """``(word width, words)`` of an MVTU stage's weight memory: ``PE*SIMD`` bits x ``NF*SF``."""
    m, n = s.layers[0].weights.shape
    return s.pe * s.simd, (m // s.pe) * (n // s.simd)


def weight_image_bytes(stages):
    """Length in bytes of the run-time weight image of ``stages`` (0 if nothing is loaded)."""
    total = 0
    for s in loaded_stages(stages):
        width, words = stage_weight_layout(s)
        total += word_bytes(width) * words
    return total


def weight_image(qmd, folding):
    """The bytes the ``weights`` stream takes (the host sends them after ``'W'``): for each
    ``"ram"`` layer in network order, its weight words (:meth:`hw.mvtu.MVTU.weight_words`
    order) as ``ceil(PE*SIMD/8)`` little-endian bytes each, unused high bits zero.
    Empty when no layer is loaded at run time."""
    from hw.mvtu import weight_bits
    parts = []
    for s in loaded_stages(plan_network(qmd, folding)):
        bits = weight_bits(s.layers[0].weights, s.pe, s.simd)           # [words, width]
        width = bits.shape[1]
        padded = np.zeros((bits.shape[0], 8 * word_bytes(width)), dtype=np.uint8)
        padded[:, :width] = bits
        parts.append(np.packbits(padded, axis=1, bitorder="little").tobytes())
    return b"".join(parts)


def _tap_signature(shape):
    return wiring.Signature({"valid": Out(1), "ready": Out(1), "payload": Out(shape)})


def stage_payload_shape(stage):
    return data.ArrayLayout(stage.out_shape, stage.out_lanes)


class Accelerator(wiring.Component):
    """The whole network as one stream pipeline; see the module docstring."""

    def __init__(self, qmd, folding, *, taps=False):
        self.qmd = qmd
        self.stages = plan_network(qmd, folding)
        # stages whose output stream goes through a register slice (folding "register_output")
        self.sliced = {s.name for s in self.stages if s.register_output}
        self.taps = taps
        first, last = self.stages[0], self.stages[-1]
        in_act = qmd.input_act
        self.pixel_shape = unsigned(8) if in_act.lo == 0 else signed(8)
        members = {
            "pixels": In(stream.Signature(data.ArrayLayout(self.pixel_shape, first.in_lanes))),
            "result": Out(stream.Signature(result_layout(last.params["classes"], last.params["logit_shape"]))),
        }
        self.loaded_stages = loaded_stages(self.stages)
        self.weight_bytes = weight_image_bytes(self.stages)
        if self.loaded_stages:
            members.update({"weights": In(stream.Signature(unsigned(8))), "weights_loaded": Out(1),
                            "weights_reload": In(1)})
        if taps:
            for s in self.stages[:-1]:
                members[f"tap_{s.name}"] = Out(_tap_signature(stage_payload_shape(s)))
        super().__init__(members)

    def stage_input_shape(self, k):
        """Amaranth shape of one input element of stage ``k``."""
        return self.pixel_shape if k == 0 else self.stages[k - 1].out_shape

    def engine(self, k):
        """A new instance of the engine of stage ``k`` (what :meth:`elaborate` instantiates)."""
        return self._engine(self.stages[k], self.stage_input_shape(k))

    def _engine(self, s, in_shape):
        """The engine of stage ``s``, whose input elements have shape ``in_shape``."""
        layer = s.layers[0] if s.layers else None
        if s.engine == "threshold_unit":
            return ThresholdUnit(in_shape,
                                 layer.arrays["thresholds"], layer.arrays["direction"],
                                 lanes=s.in_lanes, in_range=(layer.in_act.lo, layer.in_act.hi))
        if s.engine in ("xnor_mvtu", "addsub_mvtu"):
            thr = s.layers[1] if len(s.layers) == 2 else None
            binary_in = s.engine == "xnor_mvtu"
            return MVTU(layer.weights, pe=s.pe, simd=s.simd,
                        thresholds=None if thr is None else thr.arrays["thresholds"],
                        direction=None if thr is None else thr.arrays["direction"],
                        in_shape=None if binary_in else code_shape(layer.in_act),
                        in_range=None if binary_in else (layer.in_act.lo, layer.in_act.hi),
                        in_offset=0 if binary_in else layer.in_act.code[1],
                        weights_storage=s.weights or "rom")
        if s.engine == "ternary_mvtu":
            thr = s.layers[1] if len(s.layers) == 2 else None
            act = layer.in_act
            return TernaryMVTU(layer.weights, pe=s.pe, simd=s.simd,
                               thresholds=None if thr is None else thr.arrays["thresholds"],
                               direction=None if thr is None else thr.arrays["direction"],
                               pos_scale=layer.arrays.get("pos_scale"), neg_scale=layer.arrays.get("neg_scale"),
                               in_shape=code_shape(act), in_code=act.code, in_range=(act.lo, act.hi),
                               lane_fifo_depth=s.params["lane_fifo_depth"])
        if s.engine == "shift_mvtu":
            thr = s.layers[1] if len(s.layers) == 2 else None
            act = layer.in_act
            return ShiftMVTU(layer.codes, code_bits=s.params["code_bits"], exponent_offset=s.params["exponent_offset"],
                             pe=s.pe, simd=s.simd,
                             thresholds=None if thr is None else thr.arrays["thresholds"],
                             direction=None if thr is None else thr.arrays["direction"],
                             in_shape=code_shape(act), in_code=act.code, in_range=(act.lo, act.hi))
        if s.engine == "sliding_window":
            p = s.params
            return SlidingWindow(s.out_shape, p["height"], p["width"], p["channels"], p["kernel"],
                                 stride=p["stride"], padding=p["padding"], pad_value=p["pad_value"], simd=s.in_lanes)
        if s.engine == "maxpool":
            p = s.params
            return MaxPool(s.out_shape, p["height"], p["width"], p["channels"], p["kernel"], lanes=s.in_lanes,
                           binary=s.out_act.kind == "binary")
        if s.engine == "width_converter":
            return StreamWidthConverter(s.out_shape, s.in_lanes, s.out_lanes)
        if s.engine == "argmax_output":
            return ArgmaxOutput(s.params["logit_shape"], s.params["classes"], lanes=s.in_lanes)
        raise AssertionError(s.engine)

    def elaborate(self, platform):
        m = Module()
        prev_out = None
        loaded = []
        for k, s in enumerate(self.stages):
            eng = self.engine(k)
            m.submodules[s.name] = eng
            if s.weights == "ram":
                loaded.append(eng)
            if prev_out is None:
                wiring.connect(m, wiring.flipped(self.pixels), eng.i)
            else:
                wiring.connect(m, prev_out, eng.i)
            if self.taps and k < len(self.stages) - 1:
                tap = getattr(self, f"tap_{s.name}")
                m.d.comb += [tap.valid.eq(eng.o.valid), tap.ready.eq(eng.o.ready), tap.payload.eq(eng.o.payload)]
            prev_out = eng.o
            if s.name in self.sliced:
                m.submodules[f"reg_{s.name}"] = reg = StreamRegisterSlice(eng.o.signature.members["payload"].shape)
                wiring.connect(m, eng.o, reg.i)
                prev_out = reg.o
        wiring.connect(m, prev_out, wiring.flipped(self.result))
        if loaded:
            m.submodules.weight_loader = loader = WeightLoader([(e.weight_word_width, e.nf * e.sf) for e in loaded])
            wiring.connect(m, wiring.flipped(self.weights), loader.i)
            m.d.comb += loader.reload.eq(self.weights_reload)
            ready = 1
            for k, eng in enumerate(loaded):
                wiring.connect(m, getattr(loader, f"o{k}"), eng.load)
                m.d.comb += eng.reload.eq(self.weights_reload)
                ready = ready & eng.loaded
            m.d.comb += self.weights_loaded.eq(ready)
        return m
