"""Command line: ``python -m qnnfab <command>``; the Makefile targets call these.

  verilog --model M         generate build/M/M.v, report.json, report.md
  sim     --model M         RTL simulation on real test images -> build/M/sim.json
  sim-full --model M        the whole test set through the RTL -> build/M/sim_full.json
  eval    --model M         integer reference accuracy on the test set -> build/M/eval.json
  check   --model M         validate the QMD and its folding
  synth   --model M --board B   synthesis + place-and-route -> build/M/synth-B.json/.md/.svg
  fold    --model M (--fps F [--clock-mhz C] | --device D)   automatic folding -> a folding JSON
  train / export            quantization-aware training and export (models.train / models.export)

A model is a zoo name (models/zoo/<name>) or a path to a QMD directory. Errors in user
input print one line, ``error: <file>: <what>``, and exit with status 2.
"""

import argparse
import sys
import time
from pathlib import Path

from qnnfab.errors import QnnfabError
from qnnfab.paths import build_dir, model_dir


def _load(model, folding_path=None, device=None):
    """The QMD and its folding: ``folding_path``, else ``folding-<device>.json`` when ``device``
    is given and the model has one, else ``folding.json``."""
    from hw.folding import default_folding_path, load_folding
    qmd = _load_qmd_only(model)
    folding = load_folding(Path(folding_path) if folding_path else default_folding_path(qmd.path, device), qmd)
    return qmd, folding


def _dataset(qmd):
    if not qmd.dataset:
        raise QnnfabError("the description names no 'dataset' to take test images from",
                          where=str(qmd.path / "qmd.json"))
    from models.data import load_dataset
    return load_dataset(qmd.dataset, "test")


def cmd_verilog(args):
    from hw.network import Accelerator
    from hw.report import design_markdown, design_report, write_json
    from sim.rtl import write_verilog
    qmd, folding = _load(args.model, args.folding)
    out = build_dir(qmd.name)
    acc = Accelerator(qmd, folding)
    vpath = write_verilog(acc, out / f"{qmd.name}.v", name=qmd.name)
    rep = design_report(qmd, folding, acc.stages, vpath, qmd.name,
                        shift_costs=_shift_costs(acc, out, getattr(args, "synth_costs", False)))
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(design_markdown(rep))
    print(design_markdown(rep))
    print(f"wrote {vpath}, {out / 'report.json'}, {out / 'report.md'}")


def _shift_costs(acc, out, synthesize):
    """Yosys cost figures of the shift-add stages (boards/shift_cost.py): measured now with
    ``--synth-costs``, else whatever a previous measurement of the same engines cached."""
    stages = [(k, s) for k, s in enumerate(acc.stages) if s.engine == "shift_mvtu"]
    if not stages:
        return {}
    from boards.shift_cost import shift_layer_costs
    res = {}
    for k, s in stages:
        eng = acc.engine(k)
        eng._MustUse__silence = True
        if synthesize:
            print(f"synthesizing {s.name} and its multiplier twin for the cost comparison ...", flush=True)
        res[s.name] = shift_layer_costs(eng, out / "shift_costs", synthesize=synthesize)
    return res


def cmd_sim(args):
    import numpy as np

    from hw.report import write_json
    from sim.rtl import simulate
    qmd, folding = _load(args.model, args.folding)
    images, labels = _dataset(qmd)
    n = min(args.images, len(images))
    out = build_dir(qmd.name)
    t0 = time.time()
    rep = simulate(qmd, folding, images[:n], out / "rtl", in_stall=args.stall, out_stall=args.stall, seed=args.seed)
    rep["seconds"] = round(time.time() - t0, 1)
    hw_classes = np.array(rep.pop("hardware_classes"))
    rep["hardware_accuracy"] = float((hw_classes == labels[:n]).mean())
    write_json(out / "sim.json", rep)
    ok = rep["mismatches"] == 0
    cpf_m, cpf_a = rep["cycles_per_frame_measured"], rep["cycles_per_frame_analytic"]
    print(f"{qmd.name}: {n} images through the RTL, {rep['integers_compared']:,} integers in "
          f"{rep['layers_compared']} layers compared, {rep['mismatches']} mismatches "
          f"({'bit-exact' if ok else 'MISMATCH'})")
    if cpf_m is not None:
        print(f"cycles/frame: measured {cpf_m:.1f}, analytic {cpf_a} ({100 * (cpf_m - cpf_a) / cpf_a:+.2f}%); "
              f"simulation took {rep['seconds']} s")
    print(f"wrote {out / 'sim.json'}")
    return 0 if ok else 1


def cmd_sim_full(args):
    from hw.report import write_json
    from sim.fast import simulate_all
    qmd, folding = _load(args.model, args.folding)
    images, labels = _dataset(qmd)
    n = min(args.images or len(images), len(images))
    out = build_dir(qmd.name)
    t0 = time.time()
    rep = simulate_all(qmd, folding, images[:n], labels[:n], out / "rtl_full")
    rep["seconds"] = round(time.time() - t0, 1)
    write_json(out / "sim_full.json", rep)
    ok = rep["mismatches"] == 0
    print(f"{qmd.name}: {n} test images through the RTL (C++ Verilator harness): hardware accuracy "
          f"{100 * rep['hardware_accuracy']:.2f}%, reference {100 * rep['reference_accuracy']:.2f}%, "
          f"{rep['mismatches']} mismatching integers ({'bit-exact' if ok else 'MISMATCH'})")
    print(f"cycles/frame measured {rep['cycles_per_frame_measured']}, analytic {rep['cycles_per_frame_analytic']}; "
          f"{rep['seconds']} s in all ({rep['build_seconds']} s build, {rep['simulation_seconds']} s simulation)")
    print(f"wrote {out / 'sim_full.json'}")
    return 0 if ok else 1


def cmd_eval(args):
    from hw.report import write_json
    from models.reference import accuracy
    qmd = _load_qmd_only(args.model)
    images, labels = _dataset(qmd)
    acc = accuracy(qmd, images, labels)
    rep = {"model": qmd.name, "dataset": qmd.dataset, "test_images": len(images), "integer_accuracy": acc,
           "qat_accuracy": qmd.provenance.get("qat_accuracy")}
    rep.update(_float_baseline(qmd, images, labels, acc))
    out = build_dir(qmd.name)
    write_json(out / "eval.json", rep)
    qat = rep["qat_accuracy"]
    print(f"{qmd.name}: integer reference accuracy {100 * acc:.2f}% on {len(images)} test images"
          + (f"; QAT model at export {100 * qat:.2f}%" if qat is not None else ""))
    print(f"wrote {out / 'eval.json'}")


def _float_baseline(qmd, images, labels, integer_accuracy):
    """``float_baseline_accuracy`` of a model whose export names a float baseline (shift_cifar:
    float_cifar): measured now on the same test images from the baseline's checkpoint when it is
    there, else the figure measured at export (provenance); {} for models without one."""
    fb = qmd.provenance.get("float_baseline")
    if not isinstance(fb, dict) or not fb.get("model"):
        return {}
    from models.export import measure_float_baseline
    now = measure_float_baseline(fb["model"], images, labels)
    acc, when = (now["accuracy"], "now") if now["accuracy"] is not None else (fb.get("accuracy"), "at export")
    out = {"float_baseline": fb["model"], "float_baseline_accuracy": acc,
           "float_baseline_measured": when if acc is not None else None}
    if acc is not None:
        out["integer_minus_float_baseline_points"] = round(100 * (integer_accuracy - acc), 2)
    return out


def cmd_synth(args):
    from boards.synth import run_synth
    from boards.synth_report import synth_markdown
    rep, paths = run_synth(args.model, args.board, folding_path=args.folding, seed=args.seed,
                           target_mhz=args.target_mhz)
    print(synth_markdown(rep, paths[2].name))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0 if rep["fits"] else 1


def cmd_fold(args):
    import json

    from hw.autofold import estimate_totals, fold_for_budget, fold_for_fps
    from hw.folding import FORMAT, validate_folding
    qmd = _load_qmd_only(args.model)
    if (args.fps is None) == (args.device is None):
        raise QnnfabError("give exactly one of --fps (TARGET_FPS) or --device (DEVICE_BUDGET)")
    if args.fps is not None:
        family = "ecp5"
        registered = args.register_outputs == "yes"
        folding = fold_for_fps(qmd, args.fps, args.clock_mhz, registered)
        goal = f"{args.fps:g} frames/s at {args.clock_mhz:g} MHz"
    else:
        from boards.targets import get_device
        dev = get_device(args.device)
        family = dev.family
        # ECP5 default: slices cut the backpressure chain that limited the CNV (43.5 -> 50.3 MHz)
        registered = args.register_outputs == "yes" or (args.register_outputs == "auto" and family == "ecp5")
        folding = fold_for_budget(qmd, dev, args.utilization, registered)
        goal = f"fastest within {100 * args.utilization:.0f}% of the {dev.part}'s LUTs and its block RAM"
    validate_folding(folding, qmd, where="autofold")
    tot = estimate_totals(qmd, folding, family)
    out = Path(args.out) if args.out else build_dir(qmd.name) / "folding-auto.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"format": FORMAT, "goal": goal, "layers": folding}, indent=1) + "\n")
    for name, f in folding.items():
        print(f"  {name:10s} PE {f['pe']:4d}  SIMD {f['simd']:4d}" + ("  weights in RAM (loaded at run time)"
                                                                       if f.get("weights") == "ram" else ""))
    if registered:
        print("  (every layer's output stream through a register slice: register_output)")
    print(f"{qmd.name}: {goal}: {tot['cycles_per_frame']:,} cycles/frame, estimated {tot['luts']:,} LUTs, "
          f"{tot['ffs']:,} FFs, {tot['bram_blocks']} {family} block RAMs"
          + (f", {tot['spram_blocks']} SPRAMs" if tot["spram_blocks"] else ""))
    print(f"wrote {out}")


def _load_qmd_only(model):
    from models.qmd import load_qmd
    d = model_dir(model)
    if not (d / "qmd.json").is_file():
        from models.nets import MODELS
        if Path(model).name in MODELS:
            raise QnnfabError(f"model '{model}' is not trained and exported yet: make train MODEL={model}, "
                              f"then make export MODEL={model}", where=str(d / "qmd.json"))
    if not d.is_dir():
        raise QnnfabError(f"unknown model '{model}': no directory {d} (zoo models live in models/zoo/)")
    return load_qmd(d)


def cmd_check(args):
    from hw.folding import load_folding
    qmd, folding = _load(args.model, args.folding)
    print(f"{qmd.path}: valid QMD v1 '{qmd.name}', {len(qmd.layers)} layers; folding valid for "
          f"{len(folding)} folded layers")
    if not args.folding:          # the per-device foldings shipped next to it, too
        for path in sorted(qmd.path.glob("folding-*.json")):
            f = load_folding(path, qmd)
            loaded = [n for n, e in f.items() if e["weights"] == "ram"]
            print(f"{path.name}: valid for {len(f)} folded layers"
                  + (f"; run-time loaded weights: {', '.join(loaded)}" if loaded else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qnnfab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_cmd(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True, help="zoo name or QMD directory")
        p.add_argument("--folding", help="folding JSON (default: <model dir>/folding.json)")
        p.set_defaults(fn=fn)
        return p

    p = model_cmd("verilog", cmd_verilog, "generate Verilog and the design report")
    p.add_argument("--synth-costs", action="store_true",
                   help="synthesize each shift-add stage and a multiplier MAC twin with Yosys for the report's "
                        "multipliers / luts_per_mac (cached in build/<model>/shift_costs)")
    p = model_cmd("sim", cmd_sim, "RTL simulation against the integer reference")
    p.add_argument("--images", type=int, default=100, help="number of test images (default 100)")
    p.add_argument("--stall", type=float, default=0.0, help="probability of valid/ready stalls per cycle")
    p.add_argument("--seed", type=int, default=0)
    p = model_cmd("sim-full", cmd_sim_full, "the whole test set through the RTL (C++ Verilator harness)")
    p.add_argument("--images", type=int, default=0, help="limit the number of images (default: all)")
    p = sub.add_parser("eval", help="integer reference accuracy on the full test set")
    p.add_argument("--model", required=True, help="zoo name or QMD directory")
    p.set_defaults(fn=cmd_eval)
    model_cmd("check", cmd_check, "validate a QMD and its folding")
    p = model_cmd("synth", cmd_synth, "synthesis, place-and-route and bitstream for a board or bare device "
                  "(default folding: <model dir>/folding-<device>.json when it exists)")
    p.add_argument("--board", required=True, help="icebreaker, ulx3s-85f, orangecrab-25f, ooc-up5k, ooc-25f, ooc-85f")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placement seed (default 1)")
    p.add_argument("--target-mhz", type=float, help="timing target of an out-of-context run (TARGET_MHZ; "
                   "default: the target's, 48 MHz on the UP5K, 100 MHz on ECP5)")
    p = sub.add_parser("fold", help="choose PE/SIMD per layer for a frame rate or a device budget")
    p.add_argument("--model", required=True, help="zoo name or QMD directory")
    p.add_argument("--fps", type=float, help="target frames per second (TARGET_FPS)")
    p.add_argument("--clock-mhz", type=float, default=100.0, help="clock for --fps (default 100 MHz)")
    p.add_argument("--device", help="device budget: up5k, 25f or 85f (DEVICE_BUDGET)")
    p.add_argument("--utilization", type=float, default=0.8, help="fraction of the device's LUTs to use (0.8)")
    p.add_argument("--out", help="folding JSON to write (default build/<model>/folding-auto.json)")
    p.add_argument("--register-outputs", choices=("auto", "yes", "no"), default="auto",
                   help="a register slice on every layer's output stream (REGISTER_OUTPUTS; auto: yes for an "
                        "ECP5 --device budget, no otherwise)")
    p.set_defaults(fn=cmd_fold)
    for name, mod in (("train", "models.train"), ("export", "models.export")):
        p = sub.add_parser(name, help=f"see python -m {mod} --help", add_help=False)
        p.set_defaults(fn=None, module=mod)

    args, rest = parser.parse_known_args(argv)
    try:
        if args.fn is None:
            import importlib
            return importlib.import_module(args.module).main(rest) or 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.fn(args) or 0
    except QnnfabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
