"""Accuracy / cycles trade-off of exported models that share a topology and a folding
(the sparsity sweep of ``tnn_cifar``: ``tnn_cifar``, ``tnn_cifar_d10``, ``tnn_cifar_d14``).

``python -m models.sweep --models tnn_cifar tnn_cifar_d10 tnn_cifar_d14`` loads each
exported QMD (``models/zoo/<name>``), measures the integer reference's accuracy on the
test set and plans the accelerator with one folding (default: the first model's
``folding.json``), and writes ``build/sweep.json`` and ``build/sweep.md``: per model the
accuracy, the weight density (overall and per layer) and the analytic cycles per frame,
zero-skip and dense (the bottleneck stage's, and summed over the ternary engines).
"""

import argparse
import sys

import numpy as np

from hw.folding import FILENAME, load_folding
from hw.network import frame_cycles, plan_network
from qnnfab.errors import QnnfabError


def sweep_entry(qmd, folding, images, labels):
    """One model's row of the trade-off: accuracy on ``images``, densities, cycles."""
    from models.reference import accuracy
    stages = plan_network(qmd, folding)
    ternary = [s for s in stages if s.engine == "ternary_mvtu"]
    weights = [l for l in qmd.layers if l.kind in ("dense", "conv2d")]
    nonzeros = sum(int((l.weights != 0).sum()) for l in weights)
    dense_frame = max(s.params["cycles_per_frame_dense"] if s.engine == "ternary_mvtu" else s.cycles_per_frame
                      for s in stages)
    recipe = qmd.provenance.get("recipe", {})
    epochs = qmd.provenance.get("epochs")
    training = (f"{epochs} epochs" if epochs is not None else "unknown") + \
        (f" from {recipe['init_from']}" if recipe.get("init_from") else "")
    return {
        "model": qmd.name,
        "training": training,
        "integer_accuracy": accuracy(qmd, images, labels) if len(images) else None,
        "test_images": int(len(images)),
        "weight_density": nonzeros / sum(l.weights.size for l in weights),
        "layer_density": {l.name: float((l.weights != 0).mean()) for l in weights},
        "cycles_per_frame": frame_cycles(stages),
        "cycles_per_frame_dense": dense_frame,
        "ternary_cycles_sum": sum(s.cycles_per_frame for s in ternary),
        "ternary_cycles_sum_dense": sum(s.params["cycles_per_frame_dense"] for s in ternary),
        "bottleneck": next(s.name for s in stages if s.cycles_per_frame == frame_cycles(stages)),
    }


def sweep_markdown(rows):
    lines = ["| model | training | integer accuracy | weight density | cycles/frame | dense cycles/frame | "
             "ternary engines' cycles (sum) | dense (sum) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "—" if r["integer_accuracy"] is None else f"{100 * r['integer_accuracy']:.2f}%"
        lines.append(f"| {r['model']} | {r.get('training', '')} | {acc} | {100 * r['weight_density']:.1f}% | {r['cycles_per_frame']:,} | "
                     f"{r['cycles_per_frame_dense']:,} | {r['ternary_cycles_sum']:,} | "
                     f"{r['ternary_cycles_sum_dense']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from hw.report import write_json
    from models.data import load_dataset
    from qnnfab.cli import _load_qmd_only
    from qnnfab.paths import REPO_ROOT
    p = argparse.ArgumentParser(prog="python -m models.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="zoo names or QMD directories")
    p.add_argument("--folding", default=None, help="folding JSON (default: the first model's)")
    p.add_argument("--images", type=int, default=0, help="limit the test images (default: all)")
    args = p.parse_args(argv)
    try:
        qmds = [_load_qmd_only(m) for m in args.models]
        fpath = args.folding or qmds[0].path / FILENAME
        rows = []
        for qmd in qmds:
            images, labels = load_dataset(qmd.dataset, "test")
            n = args.images or len(images)
            rows.append(sweep_entry(qmd, load_folding(fpath, qmd), images[:n], labels[:n]))
    except QnnfabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = REPO_ROOT / "build"
    out.mkdir(exist_ok=True)
    write_json(out / "sweep.json", {"folding": str(fpath), "models": rows})
    md = sweep_markdown(rows)
    (out / "sweep.md").write_text(md)
    print(md + f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
