"""Zero-skip matrix-vector-threshold unit for ternary weights, folded by PE and SIMD.

Computes, for each input vector ``x`` (N values) and ternary weight matrix ``W``
(M x N, {-1, 0, +1}; with TTQ scales the integer weights ``Wq`` of docs/qmd-spec.md),
the dot products ``dot[m] = sum_n Wq[m,n] * x[n]``, then thresholds them into the next
layer's activation codes (QMD ``threshold``: the count of met thresholds) or emits them
as signed integers (the logits). Zero weights are neither stored, fetched nor scheduled.

Compressed weights: element-level gather, lane-banked inputs, independent lanes
  Lane ``j`` of a PE only handles the fan-in indices ``n = s*SIMD + j``: exactly the
  element the input stream delivers on lane ``j`` of beat ``s``. The input vector is
  kept in ``SIMD`` banks (bank ``j`` holds ``x[s*SIMD + j]`` at address ``s``), so a
  lane reads its own bank and no crossbar is needed. Lane ``j`` of PE ``p`` has its own
  schedule memory: for each of the PE's neurons ``f*PE + p`` (``f`` = 0..NF-1) the
  non-zero weights of its lane as slots ``(address gap, negative, non-zero, last)`` —
  the gap to the previous non-zero's bank address, in the fewest bits that cost no cycle
  (escape slots bridge longer gaps, in lanes that are not the busiest); one empty slot for a neuron with no non-zero in
  that lane — and walks it at one slot per cycle, accumulating the neuron's partial sum, which it pushes into a small FIFO
  at the neuron's last slot. The PE's reducer adds the ``SIMD`` partial sums of a
  neuron (an adder tree; TTQ: ``dot = pos_scale*P - neg_scale*N`` of the positive and
  negative partial sums, once per neuron) into a register, and in the next cycle applies
  the thresholds and pushes the result into the PE's output FIFO (so the sum and the
  comparison are not one path); an output beat leaves when every PE has its result.
  Lanes and PEs run independently, so each output's cycles follow its own non-zero count
  and a lane's load averages over all its neurons. A PE's output FIFO holds ``2*NF + 2``
  results (a PE may run up to two vectors ahead of the others); a lane's partial-sum FIFO
  is only as deep as costs no cycle (:meth:`TernarySchedule.lane_fifo_depth`: a max-plus
  model of the lanes and the reducer, which predicts the RTL's interval exactly, gives the
  shallowest depth with each PE's unbounded-FIFO interval, plus a margin of 2; 4-6
  entries on random layers, instead of ``2*NF + 2``).

Cycles per vector (exact, from the weight pattern; :func:`ternary_schedule`):
  ``max(max over lanes (p, j) of sum_f max(1, nnz(f*PE + p, lane j)), SF)`` with
  ``SF = N/SIMD``: the busiest lane, but at least the ``SF`` beats the input vector
  takes to arrive. A dense engine of the same folding takes ``NF*SF``.

Pipeline of a lane (two stages, like :class:`hw.mvtu.MVTU`):
  A: slot ``sp`` (its schedule memory is read one cycle ahead) gives the bank address
     (the previous slot's plus the gap) and drives the bank read; it issues when the
     lane's current input half is full and the lane has not finished it.
  B: ``value = scale*code + offset`` of the input code (binary bits ``2r-1``, ternary
     codes ``r-1``, integers as they are), negated or zeroed by the slot, accumulated.
  A lane freezes (its ``advance`` low, read enables included) only when a partial sum
  finds its FIFO full, so back-pressure loses or duplicates nothing.

Input double buffer: the stream writes one half (``SF`` codes in every lane bank) while
the lanes read the other; a half is released when every lane has issued its last read
of it, in the cycle of that read (a read port samples before the next write lands).

Stream interface (identical to :class:`hw.mvtu.MVTU`)
  ``i``: ``SIMD`` input codes per beat; one vector = ``SF`` beats, element ``k`` of beat
  ``s`` is ``x[s*SIMD + k]``.
  ``o``: ``PE`` elements per beat; one vector = ``NF`` beats, element ``p`` of beat ``f``
  is output channel ``f*PE + p``.
"""

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import bits_for, code_range, dot_range, dot_thresholds, ge_threshold_count, sum_tree


def _check_fold(name, total, par, what):
    if not isinstance(par, int) or isinstance(par, bool) or par < 1:
        raise ValueError(f"{what} must be a positive integer, got {par!r}")
    if total % par:
        raise ValueError(f"{name}: {total} is not divisible by {what}={par}")


@dataclass
class TernarySchedule:
    """The compressed weights of a ternary engine and its exact cycle counts.

    Lane ``j`` of PE ``p`` walks its own list: for each neuron ``f*PE + p`` (``f`` =
    0..NF-1) the non-zeros ``W[f*PE+p, s*SIMD + j]`` in increasing ``s`` (one empty slot
    when there are none), the neuron's last slot flagged. A slot stores the address *gap*
    ``s - s_previous`` (from 0 at the neuron's first slot) in ``gap_bits``; a gap too
    large for them is bridged by escape slots (empty, gap ``2^gap_bits - 1``). ``nz``,
    ``neg``, ``gap``, ``addr`` (the absolute address, for checks), ``last`` are dicts
    ``(p, j) -> 1-D array`` over the slots; ``lane_steps[p, j]`` is the list's length,
    the cycles lane ``(p, j)`` needs per vector."""

    m: int
    n: int
    pe: int
    simd: int
    nonzeros: int
    gap_bits: int
    lane_steps: np.ndarray
    nz: dict
    neg: dict
    gap: dict
    addr: dict
    last: dict

    @property
    def nf(self):
        return self.m // self.pe

    @property
    def sf(self):
        return self.n // self.simd

    @property
    def density(self):
        """Fraction of non-zero weights."""
        return self.nonzeros / (self.m * self.n)

    @property
    def cycles_per_vector(self):
        """Cycles per input vector in steady state: the busiest lane, at least the input's SF beats."""
        return max(int(self.lane_steps.max()), self.sf)

    @property
    def dense_cycles_per_vector(self):
        """What a dense engine of the same PE/SIMD needs: ``NF*SF``."""
        return self.nf * self.sf

    @property
    def addr_bits(self):
        """Bits of a bank address (``0 .. SF-1``)."""
        return max(1, (self.sf - 1).bit_length())

    @property
    def slot_bits(self):
        """Bits of one schedule slot: the address gap, negative, non-zero and last bits."""
        return self.gap_bits + 3

    @property
    def schedule_bits(self):
        """Memory bits of the compressed weights (every lane's schedule memory)."""
        return int(self.lane_steps.sum()) * self.slot_bits

    def neuron_steps(self):
        """``[PE, SIMD, NF]``: the slots (escapes included) lane ``(p, j)`` spends on neuron ``f*PE + p``."""
        out = np.zeros((self.pe, self.simd, self.nf), dtype=np.int64)
        for (p, j), last in self.last.items():
            out[p, j] = np.diff(np.append(-1, np.flatnonzero(last)))
        return out

    def pe_intervals(self, depth, vectors=3):
        """Cycles between the last two vector boundaries of every PE when its lanes' partial-sum
        FIFOs hold ``depth`` neurons (None: unbounded), in a max-plus model of the lanes and the
        reducer: lane ``j`` pushes neuron ``k`` at ``P_j(k) = max(P_j(k-1) + steps_j(k),
        R(k - depth) + 1)`` (its FIFO must have room), the reducer takes it at ``R(k) =
        max(max_j P_j(k) + 1, R(k-1) + 1)``; inputs and outputs never wait."""
        steps = np.tile(self.neuron_steps(), (1, 1, vectors))          # [p, j, k] over `vectors` vectors
        pe, simd, total = steps.shape
        push = np.zeros((pe, simd))
        red = np.full((pe, total), -np.inf)
        last = np.full(pe, -np.inf)
        for k in range(total):
            room = red[:, k - depth] + 1 if depth is not None and k >= depth else -np.inf
            push = np.maximum(push + steps[:, :, k], room[:, None] if np.ndim(room) else room)
            last = np.maximum(push.max(axis=1) + 1, last + 1)
            red[:, k] = last
        return (red[:, -1] - red[:, -1 - self.nf]).astype(np.int64)

    def lane_fifo_depth(self, margin=2, floor=4):
        """Depth of the lanes' partial-sum FIFOs: the shallowest that costs no cycle in
        :meth:`pe_intervals` (the same interval per PE as unbounded FIFOs), plus ``margin`` for
        the pipeline latencies the model leaves out, at least ``floor``, at most ``2*NF + 2``
        (a lane up to two vectors ahead never waits)."""
        cap = 2 * self.nf + 2
        free = self.pe_intervals(None)

        def enough(d):
            return bool((self.pe_intervals(d) <= free).all())

        hi = 1                                            # doubling, then bisection: most layers need 1-2
        while hi < cap and not enough(hi):
            hi *= 2
        if hi >= cap:
            if not enough(cap):
                return cap
            hi = cap
        lo = hi // 2 + 1                                  # enough(hi); not enough(hi // 2) when hi > 1
        while lo < hi:
            mid = (lo + hi) // 2
            if enough(mid):
                hi = mid
            else:
                lo = mid + 1
        return int(min(cap, max(floor, lo + margin)))


def _lane_lists(w, pe, simd):
    """Per lane ``(p, j)``: neuron fold, address, non-zero flag and sign of each slot
    (absolute addresses; one empty slot per neuron without a non-zero in the lane)."""
    m, n = w.shape
    nf, sf = m // pe, n // simd
    lanes = w.reshape(nf, pe, sf, simd)                  # [f, p, s, j] = W[f*PE + p, s*SIMD + j]
    out = {}
    for p in range(pe):
        for j in range(simd):
            sub = lanes[:, p, :, j]                      # [f, s]
            rows, cols = np.nonzero(sub)                 # row-major: by neuron, then address
            empty = np.flatnonzero(~sub.any(axis=1))
            r = np.concatenate([rows, empty])
            c = np.concatenate([cols, np.zeros(len(empty), dtype=cols.dtype)])
            z = np.concatenate([np.ones(len(rows), bool), np.zeros(len(empty), bool)])
            order = np.lexsort((c, r))
            r, c, z = r[order], c[order], z[order]
            start = np.append(True, r[1:] != r[:-1])
            gap = c - np.where(start, 0, np.append(0, c[:-1]))
            out[p, j] = (r, c, z, z & (sub[r, c] < 0), gap)
    return out


def _escapes(gap, bits):
    """Escape slots needed before each slot whose gap exceeds ``2^bits - 1``."""
    g = (1 << bits) - 1
    return np.maximum(0, -(-gap // g) - 1)


def ternary_schedule(weights, pe, simd, gap_bits=None):
    """Compress the ternary matrix ``weights`` [M, N] for a PE x SIMD engine; see the module
    docstring. ``gap_bits`` (default: chosen) is the width of a slot's address gap: the
    default is the narrowest whose escape slots add no cycle to the vector (they land in
    lanes that are not the busiest), so the cycles are those of full-width addresses."""
    w = np.asarray(weights)
    if w.ndim != 2 or not np.isin(w, (-1, 0, 1)).all():
        raise ValueError("weights must be a 2-D array of -1/0/+1")
    m, n = w.shape
    _check_fold("output channels", m, pe, "PE")
    _check_fold("input features", n, simd, "SIMD")
    nf, sf = m // pe, n // simd
    lists = _lane_lists(w, pe, simd)
    full = max(1, (sf - 1).bit_length())
    base = np.array([[len(lists[p, j][0]) for j in range(simd)] for p in range(pe)], dtype=np.int64)

    def steps(bits):
        return base + np.array([[int(_escapes(lists[p, j][4], bits).sum()) for j in range(simd)]
                                for p in range(pe)], dtype=np.int64)

    if gap_bits is None:
        budget = max(int(base.max()), sf)
        gap_bits = next(b for b in range(1, full + 1) if max(int(steps(b).max()), sf) <= budget)
    elif not isinstance(gap_bits, int) or not 1 <= gap_bits <= full:
        raise ValueError(f"gap_bits must be an integer in 1..{full}, got {gap_bits!r}")
    g = (1 << gap_bits) - 1
    nz, neg, gap, addr, last = {}, {}, {}, {}, {}
    for (p, j), (r, c, z, ng, gp) in lists.items():
        esc = _escapes(gp, gap_bits)
        idx = np.repeat(np.arange(len(r)), esc + 1)             # slot -> the list entry it belongs to
        k = np.arange(len(idx)) - np.repeat(np.cumsum(esc + 1) - (esc + 1), esc + 1)
        real = k == esc[idx]                                    # the entry's own slot (after its escapes)
        nz[p, j] = z[idx] & real
        neg[p, j] = ng[idx] & real
        gap[p, j] = np.where(real, gp[idx] - esc[idx] * g, g)
        addr[p, j] = np.where(real, c[idx], 0)
        last[p, j] = np.append(r[idx][1:] != r[idx][:-1], True) & real
    lane_steps = np.array([[len(nz[p, j]) for j in range(simd)] for p in range(pe)], dtype=np.int64)
    return TernarySchedule(m, n, pe, simd, int((w != 0).sum()), gap_bits, lane_steps, nz, neg, gap, addr, last)


class TernaryMVTU(wiring.Component):
    """Zero-skip ternary matrix-vector(-threshold) unit; see the module docstring.

    Parameters
    ----------
    weights : array [M, N] of -1/0/+1 (the QMD's ternary signs)
    pe, simd : folding (``PE`` divides M, ``SIMD`` divides N)
    thresholds, direction : None, or the QMD threshold arrays ``[M][T]`` and ``[M]`` (in the
        spec's domain, the dot product)
    pos_scale, neg_scale : None, or TTQ's integer scales ``[M]`` (both or neither)
    in_shape : Amaranth shape of an input code (``unsigned(1)`` for binary activations)
    in_code : ``(scale, offset)``: an input code ``r`` stands for ``scale*r + offset``
        (binary ``(2, -1)``, ternary ``(1, -1)``, integers ``(1, 0)``)
    in_range : ``(lo, hi)`` of the input values (default: every code of ``in_shape``)
    gap_bits : width of a schedule slot's address gap (default: chosen by :func:`ternary_schedule`)
    lane_fifo_depth : neurons a lane's partial-sum FIFO holds (default: the shallowest that costs
        no cycle, :meth:`TernarySchedule.lane_fifo_depth`)
    """

    def __init__(self, weights, *, pe, simd, thresholds=None, direction=None, pos_scale=None, neg_scale=None,
                 in_shape=unsigned(1), in_code=(2, -1), in_range=None, gap_bits=None, lane_fifo_depth=None):
        self.sched = ternary_schedule(weights, pe, simd, gap_bits)
        self.weights = np.asarray(weights).astype(np.int64)
        self.m, self.n = self.weights.shape
        self.pe, self.simd = pe, simd
        self.nf, self.sf = self.m // pe, self.n // simd
        self.in_shape = Shape.cast(in_shape)
        if (not isinstance(in_code, tuple) or len(in_code) != 2 or not all(isinstance(v, int) for v in in_code)
                or in_code[0] < 1):
            raise ValueError(f"in_code must be a pair (scale >= 1, offset) of integers, got {in_code!r}")
        self.in_code = in_code
        lo, hi = self.in_range = code_range(self.in_shape, in_code, in_range)
        xmax = max(abs(lo), abs(hi))
        if (pos_scale is None) != (neg_scale is None):
            raise ValueError("pos_scale and neg_scale must be given together")
        self.ttq = pos_scale is not None
        if self.ttq:
            self.pos_scale = np.asarray(pos_scale, dtype=np.int64).reshape(-1)
            self.neg_scale = np.asarray(neg_scale, dtype=np.int64).reshape(-1)
            for name, a in (("pos_scale", self.pos_scale), ("neg_scale", self.neg_scale)):
                if a.shape != (self.m,) or (a < 1).any():
                    raise ValueError(f"{name} must be {self.m} positive integers")
            wq = np.where(self.weights > 0, self.pos_scale[:, None],
                          np.where(self.weights < 0, -self.neg_scale[:, None], 0))
            self.scale_shape = unsigned(bits_for(int(max(self.pos_scale.max(), self.neg_scale.max()))))
        else:
            wq = self.weights
        # a lane's partial sums add at most SF values; the dot product's exact range
        self.part_shape = signed(bits_for(self.sf * xmax) + 1)
        self.dot_range = dot_range(wq, lo, hi)
        self.n_thresholds, self.ge, self.invert, self.thr_shape, self.out_elem = \
            dot_thresholds(thresholds, direction, self.m, self.dot_range)
        out_elem = self.out_elem
        self.fifo_depth = 2 * self.nf + 2     # a lane or PE up to two vectors ahead never waits
        if lane_fifo_depth is None:
            lane_fifo_depth = self.sched.lane_fifo_depth()
        elif isinstance(lane_fifo_depth, bool) or not isinstance(lane_fifo_depth, int) or lane_fifo_depth < 1:
            raise ValueError(f"lane_fifo_depth must be a positive integer, got {lane_fifo_depth!r}")
        self.lane_fifo_depth = lane_fifo_depth
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(self.in_shape, simd))),
            "o": Out(stream.Signature(data.ArrayLayout(out_elem, pe))),
        })

    # -- analytic figures ------------------------------------------------------------------

    @property
    def cycles_per_vector(self):
        return self.sched.cycles_per_vector

    # -- memory contents -------------------------------------------------------------------

    def schedule_words(self, p, j):
        """Schedule memory of lane ``j`` of PE ``p``, one word per slot: the address gap
        (bits ``0..G-1``), then the negative, non-zero and last bits."""
        s, gb = self.sched, self.sched.gap_bits
        return [int(a) | int(ng) << gb | int(z) << (gb + 1) | int(l) << (gb + 2)
                for a, ng, z, l in zip(s.gap[p, j], s.neg[p, j], s.nz[p, j], s.last[p, j])]

    def _param_fields(self):
        fields = []
        if self.n_thresholds:
            fields += [("thr", self.thr_shape)] * self.n_thresholds + [("inv", unsigned(1))]
        if self.ttq:
            fields += [("pos", self.scale_shape), ("neg", self.scale_shape)]
        return fields

    def param_words(self, p):
        """Per-neuron parameters of PE ``p`` (word ``f`` = neuron ``f*PE + p``): the ``>=``
        thresholds, the invert flag, TTQ's pos/neg scales, packed from bit 0 upwards."""
        words = []
        for f in range(self.nf):
            r = f * self.pe + p
            vals = []
            if self.n_thresholds:
                vals += [int(v) for v in self.ge[r]] + [int(self.invert[r])]
            if self.ttq:
                vals += [int(self.pos_scale[r]), int(self.neg_scale[r])]
            word, pos = 0, 0
            for (_, shape), v in zip(self._param_fields(), vals):
                word |= (v & ((1 << shape.width) - 1)) << pos
                pos += shape.width
            words.append(word)
        return words

    # -- hardware ----------------------------------------------------------------------------

    def _lane(self, m, p, j, bank, full, fifo_w):
        """Lane ``j`` of PE ``p``: walks its schedule, reads its bank, accumulates each
        neuron's partial sum(s) and pushes them into ``fifo_w``. Returns its ``(release,
        done)`` signals (2 bits each: the input half it finished this cycle / before)."""
        sched, sf, nf = self.sched, self.sf, self.nf
        gb = sched.gap_bits
        depth = int(sched.lane_steps[p, j])
        smem = memory.Memory(shape=unsigned(sched.slot_bits), depth=depth, init=self.schedule_words(p, j))
        m.submodules[f"sched_{p}_{j}"] = smem
        s_rd = smem.read_port()
        b_rd = bank.read_port()
        tag = f"{p}_{j}"
        advance, primed, rsel = Signal(name=f"advance_{tag}"), Signal(name=f"primed_{tag}"), Signal(name=f"rsel_{tag}")
        sp = Signal(range(depth), name=f"sp_{tag}")
        f_a = Signal(range(nf), name=f"f_{tag}")
        first_a = Signal(init=1, name=f"first_{tag}")
        cur = Signal(range(sf), name=f"addr_{tag}")      # address of the neuron's previous slot
        done, release = Signal(2, name=f"done_{tag}"), Signal(2, name=f"release_{tag}")

        # ---- stage A: slot sp is on s_rd.data (read ahead); issue its bank read
        slot = s_rd.data
        neg_a, nz_a, last_a = slot[gb], slot[gb + 1], slot[gb + 2]
        addr_a = Signal(range(sf), name=f"addr_a_{tag}")
        m.d.comb += addr_a.eq(Mux(first_a, 0, cur) + slot[:gb])
        valid_a = primed & Mux(rsel, full[1] & ~done[1], full[0] & ~done[0])
        issue = Signal(name=f"issue_{tag}")
        m.d.comb += issue.eq(advance & valid_a)
        sp_next = Mux(issue, Mux(sp == depth - 1, 0, sp + 1), sp)
        m.d.comb += [s_rd.addr.eq(sp_next), s_rd.en.eq(advance),
                     b_rd.addr.eq(Mux(rsel, sf, 0) + addr_a), b_rd.en.eq(advance)]
        m.d.sync += sp.eq(sp_next)
        with m.If(advance):
            m.d.sync += primed.eq(1)
        with m.If(issue):
            m.d.sync += [first_a.eq(last_a), cur.eq(addr_a)]
            with m.If(last_a):
                m.d.sync += f_a.eq(Mux(f_a == nf - 1, 0, f_a + 1))
                with m.If(f_a == nf - 1):                # the vector's last read of this half
                    m.d.sync += rsel.eq(~rsel)
                    m.d.comb += release.eq(Mux(rsel, 0b10, 0b01))

        # ---- stage B: decode, select, accumulate; a neuron's partial sum(s) into the FIFO
        valid_b, first_b, last_b = Signal(name=f"valid_b_{tag}"), Signal(name=f"first_b_{tag}"), Signal(name=f"last_b_{tag}")
        nz_b, neg_b = Signal(name=f"nz_b_{tag}"), Signal(name=f"neg_b_{tag}")
        with m.If(advance):
            m.d.sync += [valid_b.eq(issue), first_b.eq(first_a), last_b.eq(last_a), nz_b.eq(nz_a), neg_b.eq(neg_a)]
        scale, offset = self.in_code
        code = b_rd.data.as_signed() if self.in_shape.signed else b_rd.data
        x = code * scale if scale != 1 else code
        x = x + offset if offset else x
        if self.ttq:
            accs = [Signal(self.part_shape, name=f"acc_p_{tag}"), Signal(self.part_shape, name=f"acc_n_{tag}")]
            terms = [Mux(nz_b & ~neg_b, x, 0), Mux(nz_b & neg_b, x, 0)]
        else:
            accs = [Signal(self.part_shape, name=f"acc_{tag}")]
            terms = [Mux(nz_b, Mux(neg_b, -x, x), 0)]
        totals = []
        for acc, term in zip(accs, terms):
            total = Signal(self.part_shape, name=f"{acc.name}_next")
            m.d.comb += total.eq(term + Mux(first_b, 0, acc))
            with m.If(advance & valid_b):
                m.d.sync += acc.eq(total)
            totals.append(total)
        push = valid_b & last_b
        m.d.comb += [advance.eq(~push | fifo_w.w_rdy), fifo_w.w_en.eq(push & fifo_w.w_rdy),
                     fifo_w.w_data.eq(Cat(*totals))]
        return release, done

    def elaborate(self, platform):
        m = Module()
        pe, simd, nf, sf = self.pe, self.simd, self.nf, self.sf
        iw = self.in_shape.width
        pw = self.part_shape.width
        parts = 2 if self.ttq else 1

        # ---- input vector: SIMD lane banks, each two halves of SF codes (double buffer), one
        # copy per PE: a memory with one write and one read port maps to LUT RAM or a block RAM,
        # where one bank read by PE ports was mapped to flip-flops and a multiplexer per port
        banks = {}
        full = [Signal(name="half0_full"), Signal(name="half1_full")]
        wsel = Signal()
        wcnt = Signal(range(sf))
        m.d.comb += self.i.ready.eq(~Mux(wsel, full[1], full[0]))
        accept = self.i.valid & self.i.ready
        for p in range(pe):
            for j in range(simd):
                bank = memory.Memory(shape=unsigned(iw), depth=2 * sf, init=[])
                m.submodules[f"bank_{p}_{j}"] = banks[p, j] = bank
                wr = bank.write_port()
                m.d.comb += [wr.addr.eq(Mux(wsel, sf, 0) + wcnt),
                             wr.data.eq(self.i.payload.as_value()[j * iw:(j + 1) * iw]), wr.en.eq(accept)]
        filled = Signal(2)           # the half the writer completed this cycle
        with m.If(accept):
            with m.If(wcnt == sf - 1):
                m.d.sync += [wcnt.eq(0), wsel.eq(~wsel)]
                m.d.comb += filled.eq(Mux(wsel, 0b10, 0b01))
            with m.Else():
                m.d.sync += wcnt.eq(wcnt + 1)

        fields = self._param_fields()
        lanes_rd = []                 # (release, done) of every lane
        out_fifos = []
        for p in range(pe):
            lane_fifos = []
            for j in range(simd):
                q = fifo.SyncFIFO(width=parts * pw, depth=self.lane_fifo_depth)
                m.submodules[f"part_{p}_{j}"] = q
                lane_fifos.append(q)
                lanes_rd.append(self._lane(m, p, j, banks[p, j], full, q))
            oq = fifo.SyncFIFO(width=self.out_elem.width, depth=self.fifo_depth)
            m.submodules[f"out_{p}"] = oq
            out_fifos.append(oq)

            # ---- reducer: one neuron when every lane has its partial sum(s)
            f_r = Signal(range(nf), name=f"f_r{p}")
            primed = Signal(name=f"primed_r{p}")
            m.d.sync += primed.eq(1)
            fire_s = Signal(name=f"fire{p}")
            valid_q = Signal(name=f"valid_q{p}")     # a reduced neuron in the register stage
            # room for this neuron after the one in the register stage is written
            m.d.comb += fire_s.eq(primed & (oq.level + valid_q < self.fifo_depth)
                                  & Cat(*[q.r_rdy for q in lane_fifos]).all())
            f_next = Mux(fire_s, Mux(f_r == nf - 1, 0, f_r + 1), f_r)
            m.d.sync += f_r.eq(f_next)
            params = {}
            if fields:
                pmem = memory.Memory(shape=unsigned(sum(sh.width for _, sh in fields)), depth=nf,
                                     init=self.param_words(p))
                m.submodules[f"param{p}"] = pmem
                p_rd = pmem.read_port()
                m.d.comb += [p_rd.addr.eq(f_next), p_rd.en.eq(1)]    # read ahead: params of f_r
                pos = 0
                for name, shape in fields:
                    v = p_rd.data[pos:pos + shape.width]
                    params.setdefault(name, []).append(v.as_signed() if shape.signed else v)
                    pos += shape.width
            heads = [[q.r_data[k * pw:(k + 1) * pw].as_signed() for q in lane_fifos] for k in range(parts)]
            dot = Signal(signed(bits_for(max(abs(v) for v in self.dot_range)) + 1), name=f"dot{p}")
            if self.ttq:
                m.d.comb += dot.eq(params["pos"][0] * sum_tree(heads[0]) - params["neg"][0] * sum_tree(heads[1]))
            else:
                m.d.comb += dot.eq(sum_tree(heads[0]))
            # register stage: the sum (and TTQ scaling) in one cycle, the comparison in the next
            dot_q = Signal.like(dot, name=f"dot_q{p}")
            m.d.sync += valid_q.eq(fire_s)
            with m.If(fire_s):
                m.d.sync += dot_q.eq(dot)
            if self.n_thresholds:
                thr_q = [Signal.like(t, name=f"thr_q{p}_{k}") for k, t in enumerate(params["thr"])]
                inv_q = Signal(name=f"inv_q{p}")
                with m.If(fire_s):
                    m.d.sync += [a.eq(b) for a, b in zip(thr_q, params["thr"])]
                    m.d.sync += inv_q.eq(params["inv"][0])
                result = ge_threshold_count(dot_q, thr_q, inv_q)
            else:
                result = dot_q
            m.d.comb += [oq.w_en.eq(valid_q), oq.w_data.eq(result)]
            m.d.comb += [q.r_en.eq(fire_s) for q in lane_fifos]

        # ---- input halves: released when every lane has issued its last read of them
        for h in range(2):
            finished = [done[h] | release[h] for release, done in lanes_rd]
            all_done = Cat(*finished).all()
            with m.If(all_done):
                m.d.sync += full[h].eq(0)
                m.d.sync += [done[h].eq(0) for _, done in lanes_rd]
            with m.Else():
                m.d.sync += [done[h].eq(fin) for (_, done), fin in zip(lanes_rd, finished)]
            with m.If(filled[h]):
                m.d.sync += full[h].eq(1)

        # ---- output: one beat when every PE has a result
        m.d.comb += self.o.valid.eq(Cat(*[q.r_rdy for q in out_fifos]).all())
        for p, q in enumerate(out_fifos):
            m.d.comb += [self.o.payload[p].eq(q.r_data), q.r_en.eq(self.o.valid & self.o.ready)]
        return m
