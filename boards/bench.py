"""``make bench``: synthesize every shipped model for every board and write one summary.

For each zoo model (``models/zoo/*/qmd.json``) and each board target (``icebreaker``,
``orangecrab-25f``, ``ulx3s-85f``) it runs :func:`boards.synth.run_synth` (which also
writes the per-model ``build/<model>/synth-<board>.*``) and records the figures; a pair
that cannot fit is a row saying why, with the numbers. Output: ``build/bench/summary.json``
and ``build/bench/summary.md``.
"""

import argparse
import json
import sys
import time

from qnnfab.errors import QnnfabError
from qnnfab.paths import BUILD_DIR, ZOO_DIR

BOARDS = ("icebreaker", "orangecrab-25f", "ulx3s-85f")
KEYS = ("device", "fits", "luts", "ffs", "bram_bits", "dsp", "fmax_mhz", "cycles_per_frame", "fps")


def shipped_models():
    return sorted(p.parent.name for p in ZOO_DIR.glob("*/qmd.json"))


def run(models, boards):
    from boards.synth import run_synth
    rows = []
    for model in models:
        for board in boards:
            t0 = time.time()
            try:
                rep, _ = run_synth(model, board)
                row = {"model": model, "board": board, **{k: rep[k] for k in KEYS}, "failure": rep["failure"]}
            except QnnfabError as e:
                row = {"model": model, "board": board, "fits": False, "failure": str(e)}
            row["seconds"] = round(time.time() - t0, 1)
            print(f"{model} on {board}: " + ("fits" if row["fits"] else f"does not fit ({row['failure']})")
                  + (f", {row['fmax_mhz']} MHz, {row['fps']:,.0f} frames/s" if row.get("fps") else ""), flush=True)
            rows.append(row)
    return rows


def markdown(rows):
    head = "| model | board | fits | LUTs | FFs | BRAM bits | DSP | Fmax MHz | cycles/frame | frames/s | note |"
    out = ["# qnnfab benchmark: every shipped model on every board", "", head, "|" + "---|" * 11]
    for r in rows:
        fps = f"{r['fps']:,.0f}" if r.get("fps") else ""
        out.append(f"| {r['model']} | {r['board']} | {'yes' if r['fits'] else 'no'} | {r.get('luts', '')} | "
                   f"{r.get('ffs', '')} | {r.get('bram_bits', '')} | {r.get('dsp', '')} | {r.get('fmax_mhz') or ''} | "
                   f"{r.get('cycles_per_frame', '')} | {fps} | {r.get('failure') or ''} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m boards.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: every shipped model")
    ap.add_argument("--boards", nargs="+", default=list(BOARDS))
    args = ap.parse_args(argv)
    rows = run(args.models or shipped_models(), args.boards)
    out = BUILD_DIR / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
