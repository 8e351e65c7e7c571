"""Matrix-vector-threshold unit (MVTU) for binary weights, folded by PE and SIMD.

Computes, for each input vector ``x`` (N values) and binary weight matrix ``W``
(M x N, {-1,+1}), the dot products ``dot[m] = sum_n W[m,n] * x[n]``, then either

* thresholds them into the next layer's activations (QMD ``threshold`` semantics:
  one threshold -> one bit, 2^b-1 -> a b-bit count), or
* emits the signed dot products (the final layer's integer logits).

Two datapaths, chosen by the input element shape:

* ``xnor``: binary inputs (bits, 1 = +1): the engine accumulates the popcount
  ``P = #{n : W[m,n] == x[n]}`` of ``~(x ^ w)``; the spec's dot is ``2P - N``, and the
  thresholds are converted to ``P`` exactly.
* ``addsub``: integer inputs (e.g. 8-bit pixels, first layer): each weight bit adds or
  subtracts its input (no multipliers); the accumulator holds ``dot`` itself.

Pipeline: A issues the memory reads; (pipelined, the default) the weight word and the input
word are registered as they leave their memories, then the popcounts of 16 lanes (xnor) or
the add/subtract sums of 4 lanes (addsub) are registered; B adds those partial sums into the
accumulator; C compares a finished total with its thresholds into the output register.
So the longest path is a 16-input popcount, or the sum of a beat's partial sums plus the
accumulator, not a block-RAM read followed by a whole SIMD-wide popcount.

Folding: ``PE`` output channels in parallel, ``SIMD`` inputs per PE per cycle;
``NF = M/PE`` neuron folds, ``SF = N/SIMD`` synapse folds, ``NF*SF`` cycles per vector.
A convolution runs as one vector per output pixel (the sliding window supplies them).

Stream interface
  ``i``: ``SIMD`` elements per beat; one vector = ``SF`` beats, element ``k`` of beat ``s``
  is ``x[s*SIMD + k]``.
  ``o``: ``PE`` elements per beat; one vector = ``NF`` beats, element ``p`` of beat ``f`` is
  output channel ``f*PE + p``.

The input vector is double-buffered (two banks in one ``lib.memory``) so the next
vector streams in while the current one is being processed: in steady state the unit
is busy every cycle. Weights sit in a memory of depth ``NF*SF`` and width
``PE*SIMD``, thresholds in one of depth ``NF``. Back-pressure on ``o`` stalls the whole
pipeline; nothing is lost or duplicated.

Weight storage (``weights_storage=``, from the folding's ``"weights"``)
  ``"rom"``: a ``lib.memory`` initialised with :meth:`MVTU.weight_words` (block RAM/ROM
  in the bitstream).
  ``"lut"``: the same initialised memory with ``rom_style = "logic"``: Yosys builds it from
  LUTs (each output bit a function of the address) instead of block RAM. Yosys does that
  for a ROM of at most 64 words or 1,024 bits anyway; the mark moves a deeper ROM out of
  block RAM (and the routing around it) for ~1.25 LUTs per bit per 16 words.
  ``"ram"``: an uninitialised :class:`hw.spram.SinglePortRAM` (SB_SPRAM256KA on an
  iCE40 UltraPlus) with one address, loaded at run time through the extra ports
  ``load`` (``In``, a stream of ``PE*SIMD``-bit words: the ``NF*SF`` words of
  :meth:`MVTU.weight_words`, in order), ``loaded`` (``Out(1)``: every word written) and
  ``reload`` (``In(1)``: a one-cycle pulse that forgets the weights and accepts a new
  load; assert it only while no vector is in flight). The engine computes nothing until
  ``loaded``: input vectors are buffered (then back-pressured) but no output appears
  before the last weight word is written. The write address is the engine's own read
  address counter, which is idle (at 0) until the load completes.
"""

import numpy as np
from amaranth.hdl import Array, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import bits_for, ge_threshold_count, popcount, sum_tree, to_ge_thresholds
from hw.folding import WEIGHT_STORAGE
from hw.spram import SinglePortRAM



def _shape_range(shape):
    shape = Shape.cast(shape)
    return (-(1 << (shape.width - 1)), (1 << (shape.width - 1)) - 1) if shape.signed else (0, (1 << shape.width) - 1)


def pipelined_sum_stages(n_terms):
    """Register stages of :meth:`MVTU._pipelined_sum` over ``n_terms`` addends."""
    return 1 + (n_terms - 1).bit_length()


def weight_bits(weights, pe, simd):
    """The weight memory as a ``[NF*SF, PE*SIMD]`` bool array: row ``f*SF + s``, column
    ``p*SIMD + k`` is ``W[f*PE + p, s*SIMD + k] == +1``."""
    w = np.asarray(weights) > 0
    m, n = w.shape
    nf, sf = m // pe, n // simd
    return w.reshape(nf, pe, sf, simd).transpose(0, 2, 1, 3).reshape(nf * sf, pe * simd)


def _check_fold(name, total, par, what):
    if not isinstance(par, int) or par < 1:
        raise ValueError(f"{what} must be a positive integer, got {par!r}")
    if total % par:
        raise ValueError(f"{name}: {total} is not divisible by {what}={par}")


class MVTU(wiring.Component):
    """Binary-weight matrix-vector(-threshold) unit; see the module docstring.

    Parameters
    ----------
    weights : array [M, N] of -1/+1
    pe, simd : folding
    thresholds, direction : None, or the QMD threshold arrays ``[M][T]`` and ``[M]``
        (in the spec's domain, the dot product)
    in_shape : None for binary inputs (bits), else the Amaranth shape of an input element
    in_range : ``(lo, hi)`` of the input values (integer inputs only; default: the shape's range)
    in_offset : integer inputs only: an input code ``r`` stands for ``r + in_offset`` (ternary
        activations arrive as ``value + 1``, so -1)
    weights_storage : ``"rom"`` (initialised memory), ``"lut"`` (initialised, built from LUTs) or
        ``"ram"`` (loaded at run time through ``load``; see the module docstring)
    pipelined : register the memory outputs and the partial sums of 16 (xnor) or 4 (addsub)
        lanes before the accumulator (default; two cycles more latency, the same throughput,
        a shorter critical path); ``False``: memory -> XNOR/popcount -> accumulator in one cycle
    """

    def __init__(self, weights, *, pe, simd, thresholds=None, direction=None, in_shape=None, in_range=None,
                 in_offset=0, weights_storage="rom", pipelined=True):
        self.pipelined = bool(pipelined)
        self.partial_stages = 2 if self.pipelined else 0
        if weights_storage not in WEIGHT_STORAGE:
            raise ValueError(f"weights_storage must be 'rom', 'lut' or 'ram', got {weights_storage!r}")
        self.weights_storage = weights_storage
        w = np.asarray(weights)
        if w.ndim != 2 or not np.isin(w, (-1, 1)).all():
            raise ValueError("weights must be a 2-D array of -1/+1")
        self.m, self.n = w.shape
        _check_fold("output channels", self.m, pe, "PE")
        _check_fold("input features", self.n, simd, "SIMD")
        self.pe, self.simd = pe, simd
        self.nf, self.sf = self.m // pe, self.n // simd
        self.weights = w
        if in_shape is None:
            self.datapath = "xnor"
            self.in_shape = unsigned(1)
            self.acc_shape = unsigned(bits_for(self.n))          # P in 0..N
            acc_lo, acc_hi, scale, offset = 0, self.n, 2, -self.n  # dot = 2P - N
        else:
            self.datapath = "addsub"
            self.in_shape = in_shape
            if not isinstance(in_offset, int) or isinstance(in_offset, bool):
                raise ValueError(f"in_offset must be an integer, got {in_offset!r}")
            self.in_offset = in_offset
            if in_range is None:
                lo, hi = _shape_range(in_shape)
                lo, hi = lo + in_offset, hi + in_offset
            else:
                lo, hi = in_range
            bound = self.n * max(abs(lo), abs(hi))
            self.acc_shape = signed(bits_for(bound) + 1)
            acc_lo, acc_hi, scale, offset = -bound, bound, 1, 0
        if thresholds is not None:
            thr = np.asarray(thresholds, dtype=np.int64).reshape(self.m, -1)
            if direction is None or len(direction) != self.m:
                raise ValueError(f"thresholds need {self.m} comparison directions")
            ge, invert = to_ge_thresholds(thr, direction, scale=scale, offset=offset)
            self.n_thresholds = thr.shape[1]
            # thresholds beyond the accumulator's range are always/never met: clamp so they fit
            self.ge = np.clip(np.asarray(ge, dtype=np.int64), acc_lo, acc_hi + 1)
            self.invert = [bool(v) for v in invert]
            self.thr_shape = Shape.cast(range(acc_lo, acc_hi + 2))
            out_elem = unsigned(bits_for(self.n_thresholds))
        else:
            self.n_thresholds = 0
            out_elem = signed(bits_for(max(abs(acc_lo * scale + offset), abs(acc_hi * scale + offset))) + 1)
        self.out_elem = out_elem
        members = {
            "i": In(stream.Signature(data.ArrayLayout(self.in_shape, simd))),
            "o": Out(stream.Signature(data.ArrayLayout(out_elem, pe))),
        }
        super().__init__(self._members(members))

    def _members(self, members):
        """``members`` plus the run-time weight load ports when the weights are in RAM."""
        if self.weights_storage == "ram":
            members = members | {"load": In(stream.Signature(unsigned(self.weight_word_width))),
                                 "loaded": Out(1), "reload": In(1)}
        return members

    @property
    def weight_word_width(self):
        """Bits per weight memory word (``PE*SIMD*weight_bits``)."""
        return self.pe * self.simd * self.weight_bits

    def weight_words(self):
        """Weight memory contents: word ``f*SF + s`` holds, at bits ``p*SIMD + k``, the bit
        of ``W[f*PE + p, s*SIMD + k]`` (1 = +1)."""
        bits = weight_bits(self.weights, self.pe, self.simd)
        weights = 1 << np.arange(bits.shape[1], dtype=object)
        return [int(row.astype(object) @ weights) for row in bits]

    def threshold_words(self):
        """Threshold memory contents: word ``f`` holds, for each PE ``p`` and threshold ``t``,
        the ``>=`` threshold of channel ``f*PE + p``, then the PE invert flags."""
        tw = self.thr_shape.width
        words = []
        for f in range(self.nf):
            word, pos = 0, 0
            for p in range(self.pe):
                for t in range(self.n_thresholds):
                    word |= (int(self.ge[f * self.pe + p, t]) & ((1 << tw) - 1)) << pos
                    pos += tw
            for p in range(self.pe):
                word |= int(self.invert[f * self.pe + p]) << pos
                pos += 1
            words.append(word)
        return words

    # -- datapath hooks (a subclass with another weight encoding overrides these) -----------

    weight_bits = 1            # weight memory bits per (PE, SIMD lane)
    weights_storage = "rom"    # a subclass with its own __init__ gets initialised weights
    partial_stages = 0         # register stages inside _partial (a pipelined datapath)
    pipelined = False
    CHUNK = {"xnor": 16, "addsub": 4}   # lanes per registered partial sum (pipelined)

    def _register(self, m, value, name):
        """``value`` one pipeline stage later (a register that moves with the whole pipeline)."""
        r = Signal(value.shape(), name=name)
        with m.If(self._advance):
            m.d.sync += r.eq(value)
        return r

    def _pipelined_sum(self, m, terms, tag):
        """The sum of ``terms`` through a register after the terms and after every adder level
        (``1 + ceil(log2(len(terms)))`` stages, :func:`pipelined_sum_stages`): every adder is a
        two-input carry chain."""
        terms = [self._register(m, v, f"{tag}_t{i}") for i, v in enumerate(terms)]
        level = 0
        while len(terms) > 1:
            nxt = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
            if len(terms) % 2:
                nxt.append(terms[-1])
            terms = [self._register(m, v, f"{tag}_l{level}_{i}") for i, v in enumerate(nxt)]
            level += 1
        return terms[0]

    def _inputs(self, m, data):
        """What every PE shares of one input beat ``data`` (``SIMD`` raw codes): the raw bits
        (xnor) or the decoded integer elements (addsub); registered first when pipelined."""
        if self.pipelined:
            data = self._register(m, data, "in_q")
        if self.datapath == "xnor":
            return data
        iw = self.in_shape.width
        elems = [data[k * iw:(k + 1) * iw] for k in range(self.simd)]
        if self.in_shape.signed:
            elems = [e.as_signed() for e in elems]
        if self.in_offset:
            elems = [e + self.in_offset for e in elems]
        return elems

    def _chunk_sums(self, shared, wbits):
        """The partial sums of one beat over groups of ``CHUNK[datapath]`` lanes: popcounts of
        ``~(x ^ w)`` (xnor) or add/subtract trees (addsub)."""
        c = self.CHUNK[self.datapath]
        if self.datapath == "xnor":
            bits = ~(shared ^ wbits)
            return [popcount(bits[i:i + c]) for i in range(0, self.simd, c)]
        terms = [Mux(wbits[k], e, -e) for k, e in enumerate(shared)]
        return [sum_tree(terms[i:i + c]) for i in range(0, self.simd, c)]

    def _partial(self, m, p, shared, wbits):
        """PE ``p``'s contribution of one beat: popcount of ``~(x ^ w)`` or the add/subtract
        tree. Pipelined: the weight word is registered as it leaves the memory (with the
        input, :meth:`_inputs`), the chunk sums are registered, and their sum feeds the
        accumulator (:attr:`partial_stages` = 2)."""
        if not self.pipelined:
            return sum_tree(self._chunk_sums(shared, wbits))
        wbits = self._register(m, wbits, f"w_q{p}")
        chunks = [self._register(m, v, f"chunk{p}_{j}") for j, v in enumerate(self._chunk_sums(shared, wbits))]
        return sum_tree(chunks)

    def elaborate(self, platform):
        m = Module()
        pe, simd, nf, sf = self.pe, self.simd, self.nf, self.sf

        # ---- input vector: two banks of SF words, written by the stream, read by the engine
        iw = self.in_shape.width
        m.submodules.inbuf = inbuf = memory.Memory(shape=unsigned(simd * iw), depth=2 * sf, init=[])
        in_wr = inbuf.write_port()
        in_rd = inbuf.read_port()
        full = Array([Signal(name="bank0_full"), Signal(name="bank1_full")])
        wsel = Signal()
        wcnt = Signal(range(sf))
        m.d.comb += [
            self.i.ready.eq(~full[wsel]),
            in_wr.addr.eq(Mux(wsel, sf, 0) + wcnt),
            in_wr.data.eq(self.i.payload.as_value()),
            in_wr.en.eq(self.i.valid & self.i.ready),
        ]
        with m.If(self.i.valid & self.i.ready):
            with m.If(wcnt == sf - 1):
                m.d.sync += [wcnt.eq(0), full[wsel].eq(1), wsel.eq(~wsel)]
            with m.Else():
                m.d.sync += wcnt.eq(wcnt + 1)

        # ---- weights and thresholds
        advance = Signal()            # the whole pipeline moves this cycle
        waddr = Signal(range(nf * sf))   # = nf_a*SF + sf_a, kept as a counter (no multiplier)
        wwidth = self.weight_word_width
        if self.weights_storage in ("rom", "lut"):
            attrs = {"rom_style": "logic"} if self.weights_storage == "lut" else None
            m.submodules.wmem = wmem = memory.Memory(shape=unsigned(wwidth), depth=nf * sf,
                                                     init=self.weight_words(), attrs=attrs)
            w_rd = wmem.read_port()
            w_data = w_rd.data
            m.d.comb += [w_rd.addr.eq(waddr), w_rd.en.eq(advance)]
            weights_ready = 1
        else:
            # one address: the engine's read counter doubles as the load's write counter
            m.submodules.wram = wram = SinglePortRAM(wwidth, nf * sf)
            w_data = wram.rdata
            weights_ready = self.loaded
            load_fire = self.load.valid & self.load.ready
            m.d.comb += [
                self.load.ready.eq(~self.loaded),
                wram.addr.eq(waddr), wram.wdata.eq(self.load.payload),
                wram.we.eq(load_fire), wram.re.eq(advance & self.loaded),
            ]
            with m.If(load_fire):
                m.d.sync += waddr.eq(Mux(waddr == nf * sf - 1, 0, waddr + 1))
                with m.If(waddr == nf * sf - 1):
                    m.d.sync += self.loaded.eq(1)
        if self.n_thresholds:
            tword = pe * self.n_thresholds * self.thr_shape.width + pe
            m.submodules.tmem = tmem = memory.Memory(shape=unsigned(tword), depth=nf,
                                                     init=self.threshold_words())
            t_rd = tmem.read_port()

        # ---- stage A: issue reads (only once the weights are there)
        rsel = Signal()
        nf_a = Signal(range(nf))
        sf_a = Signal(range(sf))
        valid_a = Signal()
        m.d.comb += valid_a.eq(full[rsel] & weights_ready)
        m.d.comb += [
            in_rd.addr.eq(Mux(rsel, sf, 0) + sf_a),
            in_rd.en.eq(advance),
        ]
        if self.n_thresholds:
            # read when the beat's partial sum leaves the datapath's pipeline (partial_stages later)
            nf_t = nf_a
            for k in range(self.partial_stages):
                nf_d = Signal.like(nf_a, name=f"nf_d{k}")
                with m.If(advance):
                    m.d.sync += nf_d.eq(nf_t)
                nf_t = nf_d
            m.d.comb += [t_rd.addr.eq(nf_t), t_rd.en.eq(advance)]
        with m.If(advance & valid_a):
            m.d.sync += waddr.eq(Mux(waddr == nf * sf - 1, 0, waddr + 1))
            with m.If(sf_a == sf - 1):
                m.d.sync += sf_a.eq(0)
                with m.If(nf_a == nf - 1):
                    m.d.sync += [nf_a.eq(0), full[rsel].eq(0), rsel.eq(~rsel)]
                with m.Else():
                    m.d.sync += nf_a.eq(nf_a + 1)
            with m.Else():
                m.d.sync += sf_a.eq(sf_a + 1)

        # ---- stage B: XNOR-popcount or add/subtract, and accumulate
        valid_b, first_b, last_b = Signal(), Signal(), Signal()
        with m.If(advance):
            m.d.sync += [valid_b.eq(valid_a), first_b.eq(sf_a == 0), last_b.eq(sf_a == sf - 1)]
        for k in range(self.partial_stages):     # the flags follow the beat through the datapath's registers
            flags = [Signal(name=f"{n}_d{k}") for n in ("valid_b", "first_b", "last_b")]
            with m.If(advance):
                m.d.sync += [f.eq(v) for f, v in zip(flags, (valid_b, first_b, last_b))]
            valid_b, first_b, last_b = flags
        self._advance = advance
        acc = [Signal(self.acc_shape, name=f"acc{p}") for p in range(pe)]
        total = [Signal(self.acc_shape, name=f"total{p}") for p in range(pe)]
        shared = self._inputs(m, in_rd.data)
        for p in range(pe):
            wb = self.weight_bits
            partial = self._partial(m, p, shared, w_data[p * simd * wb:(p + 1) * simd * wb])
            m.d.comb += total[p].eq(partial + Mux(first_b, 0, acc[p]))
            with m.If(advance & valid_b):
                m.d.sync += acc[p].eq(total[p])

        # ---- stage C: the neuron fold's total is in acc (it only changes when the pipeline
        # advances, like this stage); its thresholds are kept from stage B. Threshold (or dot
        # product) into the output register: the comparison gets a cycle of its own.
        valid_c = Signal()
        with m.If(advance):
            m.d.sync += valid_c.eq(valid_b & last_b)
        if self.n_thresholds:
            thr_c = Signal(tword)
            with m.If(advance & valid_b & last_b):
                m.d.sync += thr_c.eq(t_rd.data)
        results = []
        for p in range(pe):
            if self.n_thresholds:
                tw = self.thr_shape.width
                base = p * self.n_thresholds * tw
                thr = [thr_c[base + t * tw: base + (t + 1) * tw] for t in range(self.n_thresholds)]
                if self.thr_shape.signed:
                    thr = [t.as_signed() for t in thr]
                inv = thr_c[pe * self.n_thresholds * tw + p]
                results.append(ge_threshold_count(acc[p], thr, inv))
            elif self.datapath == "xnor":
                results.append((acc[p] << 1) - self.n)   # the spec's dot = 2P - N
            else:
                results.append(acc[p])
        m.d.comb += advance.eq(~self.o.valid | self.o.ready)
        with m.If(advance):
            m.d.sync += self.o.valid.eq(valid_c)
            with m.If(valid_c):
                m.d.sync += [self.o.payload[p].eq(results[p]) for p in range(pe)]
        if self.weights_storage == "ram":
            with m.If(self.reload):       # last, so it wins: forget the weights, load again from word 0
                m.d.sync += [self.loaded.eq(0), waddr.eq(0)]
        return m
