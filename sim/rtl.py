"""RTL simulation of a generated accelerator against the integer reference.

``simulate(qmd, folding, images)`` generates the Verilog (with observation taps on
every inner stream), builds it with Verilator, runs :mod:`sim.bench_network` under
cocotb, and compares every captured integer with :class:`models.reference.ReferenceModel`:
each stage's output stream, the logits and the class, element by element. A design with
run-time loaded (``"ram"``) weights gets its byte image (:func:`hw.network.weight_image`)
on the ``weights`` stream from the first cycle, alongside the images.
"""

import json
import os
from pathlib import Path

import numpy as np

from hw.network import Accelerator, frame_cycles, weight_image
from models.reference import ReferenceModel
from qnnfab.errors import QnnfabError
from qnnfab.paths import REPO_ROOT
from qnnfab.tools import verilator_env

TOP = "accelerator"


def write_verilog(acc, path, name=TOP):
    """Convert an :class:`Accelerator` to Verilog at ``path``."""
    from amaranth.back import verilog
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verilog.convert(acc, name=name, emit_src=False))
    return path


def stream_values(layer_out, act):
    """A reference tensor ``[frames, ...]`` as the integers its stream carries, in stream order:
    flat channels-last order, as hardware codes (binary values as bits, 1 = +1; ternary
    values as ``value + 1``; see :attr:`models.qmd.Act.code`)."""
    flat = np.asarray(layer_out).reshape(len(layer_out), -1).astype(np.int64)
    return act.encode(flat) if act is not None else flat


def window_stream(x, kernel, stride, padding, pad_value):
    """The sliding-window stream of a channels-last batch ``x`` [B, H, W, C]: per output
    pixel (row-major), the window in (ky, kx, c) order, padded with ``pad_value``."""
    import torch
    import torch.nn.functional as F
    t = torch.as_tensor(np.asarray(x)).permute(0, 3, 1, 2).to(torch.float64)
    if padding:
        t = F.pad(t, (padding,) * 4, value=float(pad_value))
    b, c = t.shape[:2]
    cols = F.unfold(t, kernel, stride=stride)                      # [B, C*K*K, L], (c, ky, kx) order
    cols = cols.reshape(b, c, kernel, kernel, -1).permute(0, 4, 2, 3, 1)  # [B, L, ky, kx, c]
    return cols.reshape(b, -1).round().to(torch.int64).numpy()


def _expected_stream(stage, qmd, trace, images, previous):
    """What the reference says ``stage``'s output stream carries, as flat integers; and its name."""
    if stage.engine == "width_converter":
        return previous, f"{stage.carries} (regrouped)"
    if stage.engine == "sliding_window":
        conv = qmd.layer(stage.carries)
        k = qmd.layers.index(conv)
        x = trace[qmd.layers[k - 1].name].numpy() if k else np.asarray(images)
        a = conv.attrs
        win = window_stream(x, a["kernel"], a["stride"], a["padding"], a.get("pad_value", 0))
        return stream_values(win, conv.in_act).reshape(-1), f"windows of {conv.name}'s input"
    layer = stage.compared_layer
    return stream_values(trace[layer.name].numpy(), stage.out_act).reshape(-1), layer.name


def _steady_interval(cycles, beats_per_frame=1, warmup=2):
    """Mean cycles between frame starts, skipping the pipeline-filling first frames."""
    starts = np.asarray(cycles)[::beats_per_frame]
    if len(starts) < 2:
        return None
    w = min(warmup, len(starts) - 2)
    return float((starts[-1] - starts[w]) / (len(starts) - 1 - w))


def simulate(qmd, folding, images, work_dir, *, in_stall=0.0, out_stall=0.0, seed=0):
    """Run ``images`` (uint8 ``[N, *input_shape]``) through the RTL; return the sim report dict."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(qmd, folding, taps=True)
    stages = acc.stages
    vfile = write_verilog(acc, work_dir / f"{TOP}_taps.v")

    frames = len(images)
    lanes = stages[0].in_lanes
    flat = np.asarray(images).reshape(frames, -1)
    pixels = flat.reshape(frames, flat.shape[1] // lanes, lanes)
    wimage = weight_image(qmd, folding)
    stim = {"pixels": pixels}
    if wimage:
        stim["weights"] = np.frombuffer(wimage, dtype=np.uint8)
    np.savez(work_dir / "stimulus.npz", **stim)

    taps = [{"name": s.name, "width": s.out_shape.width, "lanes": s.out_lanes, "signed": s.out_shape.signed}
            for s in stages[:-1]]
    last = stages[-1]
    result = {"classes": last.params["classes"], "cls_width": acc.result.payload.cls.shape().width,
              "logit_width": last.params["logit_shape"].width}
    captured = work_dir / "captured.npz"
    if captured.exists():
        captured.unlink()
    cfg = {"stimulus": str(work_dir / "stimulus.npz"), "pixel_width": acc.pixel_shape.width, "taps": taps,
           "result": result, "in_stall": in_stall, "out_stall": out_stall, "seed": seed,
           "captured": str(captured), "cycles_per_beat": frame_cycles(stages) // pixels.shape[1] + 1,
           "max_cycles": 100000 + 100 * frames * pixels.shape[1] * (frame_cycles(stages) // pixels.shape[1] + 1)
           + 20 * len(wimage)}
    (work_dir / "bench.json").write_text(json.dumps(cfg, indent=1))

    _run_cocotb(vfile, work_dir)
    if not captured.exists():
        raise QnnfabError("the RTL simulation ended without writing its results; see the log above",
                          where=str(work_dir))
    got = dict(np.load(captured))

    # ---- compare with the reference, every integer
    trace = ReferenceModel(qmd).trace(images)
    per_layer, mismatches, compared = [], 0, []
    expect = None
    for s in stages[:-1]:
        expect, what = _expected_stream(s, qmd, trace, images, expect)
        seen = got[f"tap.{s.name}"]
        n = min(len(seen), len(expect))
        bad = int((seen[:n] != expect[:n]).sum()) + abs(len(seen) - len(expect))
        mismatches += bad
        if s.compared_layer is not None:
            compared.append(s.compared_layer.name)
        per_layer.append({"stage": s.name, "carries": what, "engine": s.engine, "integers": int(len(expect)),
                          "mismatches": bad, "cycles_per_frame_analytic": s.cycles_per_frame,
                          "cycles_per_frame_measured": _steady_interval(got[f"tap_cycles.{s.name}"],
                                                                        s.out_elems // s.out_lanes)})
    logits_layer = qmd.layers[-2]
    exp_logits = trace[logits_layer.name].numpy()
    exp_cls = trace[qmd.layers[-1].name].numpy()
    bad_logits = int((got["logits"] != exp_logits).sum())
    bad_cls = int((got["cls"] != exp_cls).sum())
    mismatches += bad_logits + bad_cls
    compared.append(qmd.layers[-1].name)
    per_layer.append({"stage": last.name, "carries": f"{logits_layer.name}+{qmd.layers[-1].name}",
                      "engine": last.engine, "integers": int(exp_logits.size + exp_cls.size),
                      "mismatches": bad_logits + bad_cls, "cycles_per_frame_analytic": last.cycles_per_frame,
                      "cycles_per_frame_measured": _steady_interval(got["result_cycles"])})
    measured = _steady_interval(got["result_cycles"])
    weights_cycle = int(got["weights_cycle"])
    early = int((got["result_cycles"] <= weights_cycle).sum()) if wimage else 0
    mismatches += early           # a result before the weights are in counts as wrong, whatever it says
    return {
        "model": qmd.name, "images": frames, "mismatches": mismatches,
        "layers_compared": len(compared), "layers_compared_names": compared,
        "integers_compared": int(sum(p["integers"] for p in per_layer)),
        "class_mismatches": bad_cls, "logit_mismatches": bad_logits,
        "cycles_per_frame_measured": measured,
        "cycles_per_frame_analytic": frame_cycles(stages),
        "first_result_cycle": int(got["result_cycles"][0]),
        "in_stall": in_stall, "out_stall": out_stall,
        "weight_bytes": len(wimage), "weights_loaded_cycle": weights_cycle if wimage else None,
        "results_before_weights": early,
        "per_stage": per_layer,
        "hardware_classes": got["cls"].tolist(),
    }


def _verilator_runner():
    from cocotb_tools.runner import Verilator

    class PipVerilator(Verilator):
        """cocotb's Verilator runner with two changes:

        * only the top module's signals are made visible to VPI (a control file instead
          of ``--public-flat-rw`` on everything): the bench touches ports alone, and the
          symbol table of every inner wire took minutes of C++ compilation;
        * the PyPI wheel's verilated.mk leaves the precompiled-header include flag empty,
          which breaks parallel C++ builds; it is given here.
        """

        def _build_command(self):
            cmds = super()._build_command()
            cmds[0].remove("--public-flat-rw")
            control = Path(self.build_dir) / "public_top.vlt"
            control.write_text(f'`verilator_config\npublic_flat_rw -module "{self.hdl_toplevel}" -var "*"\n')
            cmds[0].insert(-1, str(control))
            cmds[-1] += ["CFG_CXXFLAGS_PCH_I=-include", "OPT_FAST=-O1", "OPT_SLOW=-O0"]
            return cmds

    return PipVerilator()


def _run_cocotb(vfile, work_dir, *, top=TOP, test_module="sim.bench_network", extra_sources=()):
    """Build ``vfile`` (top module ``top``, plus ``extra_sources``) with Verilator and run the
    cocotb ``test_module``; the bench reads its configuration from ``work_dir/bench.json``."""
    verilator_env()
    runner = _verilator_runner()
    build_dir = work_dir / "sim_build"
    log_file = work_dir / "verilator.log"
    try:
        runner.build(sources=[vfile, *extra_sources], hdl_toplevel=top, build_dir=build_dir, always=True,
                     build_args=["-Wno-fatal", "-Wno-lint", "-Wno-style", "--x-assign", "0", "--x-initial", "0"],
                     log_file=log_file)
    except (SystemExit, Exception) as e:
        raise QnnfabError(f"Verilator build failed ({e}); see {log_file}", where=str(vfile)) from None
    env = {"QNNFAB_BENCH": str(work_dir / "bench.json"),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "COCOTB_REDUCED_LOG_FMT": "1"}
    try:
        runner.test(test_module=test_module, hdl_toplevel=top, build_dir=build_dir, test_dir=work_dir,
                    extra_env=env, results_xml=str(work_dir / "results.xml"), log_file=work_dir / "cocotb.log")
    except SystemExit:
        raise QnnfabError(f"the cocotb bench failed; see {work_dir / 'cocotb.log'}", where=str(vfile)) from None
