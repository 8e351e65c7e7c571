"""Lane-balancing channel order for zero-skip ternary engines.

A ternary engine's cycles per vector follow its *busiest* lane (hw/ternary_mvtu.py): lane
``(p, j)`` walks the non-zeros of the neurons ``f*PE + p`` at the fan-in indices
``n = s*SIMD + j``. Because SIMD divides the input channels, lane ``j`` always sees the
same channels ``c = j (mod SIMD)``; a trained network's sparsity is strongly per channel
(some input channels keep most of their weights, others almost none), so with the
channels in training order the busiest lane can carry 40-50% more than the average
(tnn_cifar conv1 at PE=8, SIMD=16: 0.68 of the dense cycles at 47.5% density).

The order of a hidden layer's channels is free: permuting layer L's output channels
(its weight rows, its thresholds and every other per-channel array up to the next weight
layer) and layer L+1's weight columns the same way computes the same network, integer for
integer, logits and classes included. :func:`balance_channels` chooses, layer by layer,
the order of each hidden layer's outputs that balances both the PEs of layer L (its rows)
and the lanes of layer L+1 (its columns) for a given folding, by a local search (random
swaps of two channels in different PE or lane residue classes, kept when the worse of
the two layers' cycle excess over density does not grow, the summed excess breaking ties). Only the description's channel order
changes: the export then checks, on the whole test set, that the integer reference
still classifies every image as the float model does.
"""

import json
import random
from pathlib import Path

import numpy as np

from qnnfab.errors import QnnfabError

WEIGHT_KINDS = ("conv2d", "dense")
PER_CHANNEL_KINDS = ("threshold", "maxpool")


def lane_cycles(counts, pe, simd, sf):
    """Cycles per vector of a zero-skip engine whose non-zero counts per (output, input
    channel) are ``counts`` [M, C] (summed over kernel positions): the busiest lane's
    ``sum_f max(1, nnz)``, at least ``sf``; exactly :func:`hw.ternary_mvtu.ternary_schedule`'s
    count when SIMD divides C (the lane of fan-in index ``pos*C + c`` is ``c mod SIMD``)."""
    m, c = counts.shape
    lanes = counts.reshape(m, c // simd, simd).sum(axis=1)            # [M, SIMD]
    steps = np.maximum(1, lanes).reshape(m // pe, pe, simd).sum(axis=0)
    return max(int(steps.max()), sf)


def _counts(weights, in_channels):
    """Non-zeros of ``weights`` [M, ..., P*C] per (output, input channel) -> [M, C]."""
    w = np.asarray(weights)
    return (w.reshape(w.shape[0], -1, in_channels) != 0).sum(axis=1).astype(np.int64)


class _Layer:
    """One ternary weight layer's cost model: counts, folding, dense cycles, density."""

    def __init__(self, spec, in_channels, fold, where):
        self.name = spec["name"]
        w = np.asarray(spec["arrays"]["weights"])
        self.m, self.n = w.shape[0], int(np.prod(w.shape[1:]))
        self.pe, self.simd = fold
        for fld, total, v in (("pe", self.m, self.pe), ("simd", in_channels, self.simd)):
            if not isinstance(v, int) or v < 1 or total % v:
                raise QnnfabError(f"layer '{self.name}' field '{fld}': {v!r} does not divide {total}", where=where)
        self.counts = _counts(w, in_channels)
        self.sf = self.n // self.simd
        self.dense = (self.m // self.pe) * self.sf
        self.density = float((w != 0).mean())

    def excess(self, counts):
        return lane_cycles(counts, self.pe, self.simd, self.sf) / self.dense - self.density


def _fold_table(folding_path):
    try:
        doc = json.loads(Path(folding_path).read_text())
        return {k: (v["pe"], v["simd"]) for k, v in doc["layers"].items()}
    except FileNotFoundError:
        raise QnnfabError("no such folding file", where=str(folding_path)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise QnnfabError(f"not a folding ({e})", where=str(folding_path)) from None


def _search(rows, cols, order, iterations, rng):
    """Local search over ``order`` (a permutation of layer L's outputs, changed in place) minimising
    ``(max excess, summed excess)`` of layer L (``rows``, a :class:`_Layer` or None: its PEs
    are the residues mod PE of the new positions) and layer L+1 (``cols``: its lanes are the
    residues mod SIMD of the new positions)."""
    def cost(o):
        e = []
        if rows:
            e.append(rows.excess(rows.counts[o]))
        if cols:
            e.append(cols.excess(cols.counts[:, o]))
        return (max(e), sum(e))

    best = cost(order)
    c = len(order)
    mods = ([rows.pe] if rows else []) + ([cols.simd] if cols else [])
    for _ in range(iterations):
        mod = rng.choice(mods)
        if mod == 1:
            continue
        a, b = rng.sample(range(c), 2)
        if a % mod == b % mod:
            continue
        order[a], order[b] = order[b], order[a]
        now = cost(order)
        if now <= best:
            best = now
        else:
            order[a], order[b] = order[b], order[a]


def balance_channels(layers, folding_path, iterations=6000, seed=0):
    """Reorder the hidden channels of the QMD layer dicts ``layers`` (as
    :func:`models.export.qmd_layers` builds them) for the folding in ``folding_path``;
    returns ``(new layers, summary)``, the summary giving each weight layer's cycles per
    vector before and after and, for each reordered layer, ``channel_order`` (new output
    channel ``k`` is the trained model's channel ``channel_order[k]``). Only layer pairs with
    a ternary engine on either side are reordered."""
    where = str(folding_path)
    folds = _fold_table(folding_path)
    layers = [dict(s, arrays=dict(s.get("arrays", {}))) for s in layers]
    weight_idx = [i for i, s in enumerate(layers) if s["kind"] in WEIGHT_KINDS]
    for i in weight_idx:
        if layers[i]["name"] not in folds:
            raise QnnfabError(f"layer '{layers[i]['name']}': missing folding entry", where=where)

    def in_channels(i):
        s = layers[i]
        return s["in_channels"] if s["kind"] == "conv2d" else None

    ternary = {i: layers[i].get("weight") == "ternary" for i in weight_idx}
    chans = {}      # output channels of each weight layer = the next one's input channels
    for a, b in zip(weight_idx, weight_idx[1:]):
        chans[a] = layers[a]["out_channels"] if layers[a]["kind"] == "conv2d" else layers[a]["out_features"]

    def model(i, cin):
        return _Layer(layers[i], cin, folds[layers[i]["name"]], where)

    def cycles(i, cin):
        x = model(i, cin)
        return lane_cycles(x.counts, x.pe, x.simd, x.sf)

    first_cin = in_channels(weight_idx[0]) or int(np.asarray(layers[weight_idx[0]]["arrays"]["weights"]).shape[-1])
    cin_of = {weight_idx[0]: first_cin}
    for a, b in zip(weight_idx, weight_idx[1:]):
        cin_of[b] = chans[a]
    summary = {"folding": where, "layers": {}}
    for i in weight_idx:
        summary["layers"][layers[i]["name"]] = {"cycles_per_vector_before": cycles(i, cin_of[i])}

    rng = random.Random(seed)
    for a, b in zip(weight_idx, weight_idx[1:]):
        if not (ternary[a] or ternary[b]):
            continue
        c = chans[a]
        rows = model(a, cin_of[a]) if ternary[a] else None
        cols = model(b, c) if ternary[b] else None
        order = list(range(c))
        _search(rows, cols, order, iterations, rng)
        perm = np.array(order)
        if (perm == np.arange(c)).all():
            continue
        # new channel k of layer a's output is its training channel perm[k]
        summary["layers"][layers[a]["name"]]["channel_order"] = [int(v) for v in perm]
        for k in range(a, b):                       # layer a and the per-channel layers after it
            s = layers[k]
            if k > a and s["kind"] not in PER_CHANNEL_KINDS:
                raise QnnfabError(f"layer '{s['name']}': a {s['kind']} layer between weight layers "
                                  "cannot be reordered by channel")
            for key, arr in s["arrays"].items():
                arr = np.asarray(arr)
                if arr.ndim and arr.shape[0] == c:
                    s["arrays"][key] = arr[perm]
        w = np.asarray(layers[b]["arrays"]["weights"])
        shape = w.shape
        layers[b]["arrays"]["weights"] = w.reshape(shape[0], -1, c)[:, :, perm].reshape(shape)
    for i in weight_idx:
        summary["layers"][layers[i]["name"]]["cycles_per_vector_after"] = cycles(i, cin_of[i])
    return layers, summary


def layer_dicts(qmd):
    """The layer dicts of a loaded QMD, in the form :func:`balance_channels` and
    :func:`models.qmd.save_qmd` take (weights unpacked)."""
    out = []
    for layer in qmd.layers:
        d = dict(layer.attrs, name=layer.name, kind=layer.kind)
        d["arrays"] = dict(layer.arrays)
        out.append(d)
    return out
