"""ShiftCNN shift-add matrix-vector(-threshold) unit for power-of-two weights, folded by PE and SIMD.

Computes, for each input vector ``x`` (N values) and the QMD's ``pow2`` weights (M x N,
each the sum of ``T`` signed powers of two, docs/qmd-spec.md), the dot products

    dot[m] = sum over n, t with j != 0 of (-1)^sign * (x[n] << (E - t - (j - 1)))

(``j``/``sign`` the index and sign of term ``t`` of ``W[m, n]``, ``E`` the layer's
exponent offset), then thresholds them into the next layer's activation codes (the count
of met thresholds) or emits them as signed integers (the logits). No multipliers:

* **Shared shifted copies.** Every input element of a beat is decoded once
  (``value = scale*code + offset``; a power-of-two ``scale`` is a shift) and its shifted
  copies ``x << s``, ``s = 0..E``, are formed once (wiring) and shared by all PEs.
* **Term select.** Each weight term selects one copy by its codebook index (a mux tree over
  the ``2^(B-1) - 1`` copies its codebook reaches, one level per index bit, index 0
  selecting the constant 0), and a negative term contributes the one's complement
  ``~copy``; the PE's adder tree adds the count of negative terms once (``-v = ~v + 1``), so
  a zero term adds nothing and a sign costs an XOR. For unsigned inputs the complement is
  taken within the term's copy width and corrected once per term (no sign extension
  through the adder tree; 10% fewer LUTs in Yosys than sign-extended terms).
* **Accumulator widths** come from the codebooks and the fan-in: the largest weight any
  code can make is ``sum_t 2^(E-t)``, so ``|dot| <= N * max|x| * sum_t 2^(E-t)``, and the
  accumulator holds that (no overflow for any weights of these codebooks).
* **Pipelined adder tree** (default): a register after the term select and after every
  adder level (``1 + ceil(log2(terms))`` stages of latency, no cycle of throughput): every
  adder is then a two-input carry chain, where Yosys would otherwise merge the whole tree
  into one multi-operand adder of LUT full adders (about 3x the LUTs on ECP5).

Everything else is :class:`hw.mvtu.MVTU`'s (this class overrides its datapath hooks): the
double-buffered input vector, weights in one ``lib.memory`` of depth ``NF*SF`` (word
``f*SF + s`` holds, at bits ``((p*SIMD + k)*T + t)*B``, the code of term ``t`` of
``W[f*PE + p, s*SIMD + k]``), the pipeline (read, datapath, output register) frozen as a
whole by back-pressure,
thresholds in a ``lib.memory`` of depth ``NF``; ``NF*SF`` cycles per vector.

Stream interface (identical to :class:`hw.mvtu.MVTU`)
  ``i``: ``SIMD`` input codes per beat; one vector = ``SF`` beats, element ``k`` of beat
  ``s`` is ``x[s*SIMD + k]``.
  ``o``: ``PE`` elements per beat; one vector = ``NF`` beats, element ``p`` of beat ``f``
  is output channel ``f*PE + p``.
"""

import numpy as np
from amaranth.hdl import Cat, Const, Mux, Shape, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import bits_for, code_range, dot_range, dot_thresholds, popcount, sum_tree
from hw.mvtu import MVTU, WEIGHT_STORAGE, _check_fold, pipelined_sum_stages
from models.qmd import POW2_CODE_BITS, POW2_EXPONENT_MAX, POW2_TERMS, pow2_codebook_max, pow2_decode


class ShiftMVTU(MVTU):
    """Shift-add (ShiftCNN) matrix-vector(-threshold) unit; see the module docstring.

    Parameters
    ----------
    codes : uint array [M, T, N]: the QMD's pow2 term codes (``sign << (B-1) | index``)
    code_bits, exponent_offset : the layer's ``B`` and ``E``
    pe, simd : folding (``PE`` divides M, ``SIMD`` divides N)
    thresholds, direction : None, or the QMD threshold arrays ``[M][T']`` and ``[M]`` (in
        the spec's domain, the dot product)
    in_shape : Amaranth shape of an input code (``unsigned(8)`` pixels, ``unsigned(b)``
        n-bit activations, ``unsigned(1)`` binary, ``unsigned(2)`` ternary)
    in_code : ``(scale, offset)``: code ``r`` stands for ``scale*r + offset``; ``scale`` a power
        of two (a shift: binary ``(2, -1)``, ternary ``(1, -1)``, integers ``(1, 0)``)
    in_range : ``(lo, hi)`` of the input values (default: every code of ``in_shape``)
    pipelined : register the term select and every adder level (default; fewer LUTs in Yosys'
        mapping, ``partial_stages`` cycles more latency, the same throughput)
    weights_storage : ``"rom"``, ``"lut"`` or ``"ram"`` (as in :class:`hw.mvtu.MVTU`)
    """

    datapath = "shift"

    def __init__(self, codes, *, code_bits, exponent_offset, pe, simd, thresholds=None, direction=None,
                 in_shape=unsigned(8), in_code=(1, 0), in_range=None, pipelined=True, weights_storage="rom"):
        if weights_storage not in WEIGHT_STORAGE:
            raise ValueError(f"weights_storage must be 'rom', 'lut' or 'ram', got {weights_storage!r}")
        self.weights_storage = weights_storage
        for name, v, (lo, hi) in (("code_bits", code_bits, POW2_CODE_BITS),
                                  ("exponent_offset", exponent_offset, (0, POW2_EXPONENT_MAX))):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
        c = np.asarray(codes)
        if c.ndim != 3 or c.dtype.kind not in "iu" or not POW2_TERMS[0] <= c.shape[1] <= POW2_TERMS[1]:
            raise ValueError(f"codes must be an integer array [M, terms (1..{POW2_TERMS[1]}), N]")
        c = c.astype(np.int64)
        half = 1 << (code_bits - 1)
        j, sign = c & (half - 1), c >> (code_bits - 1)
        shift = exponent_offset - np.arange(c.shape[1])[None, :, None] - (j - 1)
        if (c < 0).any() or (c >= 2 * half).any():
            raise ValueError(f"codes must be in 0..{2 * half - 1} (code_bits={code_bits})")
        if ((j == 0) & (sign != 0)).any():
            raise ValueError("a zero term (index 0) must not have its sign bit set")
        if ((j > 0) & (shift < 0)).any():
            raise ValueError(f"a term is finer than 2^-{exponent_offset}: not an integer weight")
        self.codes, self.code_bits, self.exponent_offset = c, code_bits, exponent_offset
        self.m, self.terms, self.n = c.shape
        _check_fold("output channels", self.m, pe, "PE")
        _check_fold("input features", self.n, simd, "SIMD")
        self.pe, self.simd = pe, simd
        self.nf, self.sf = self.m // pe, self.n // simd
        self.weights = pow2_decode(c, code_bits, exponent_offset)        # Wq, for checks and reports

        self.in_shape = Shape.cast(in_shape)
        if (not isinstance(in_code, tuple) or len(in_code) != 2 or not all(isinstance(v, int) for v in in_code)
                or in_code[0] < 1 or in_code[0] & (in_code[0] - 1)):
            raise ValueError(f"in_code must be a pair (scale, offset) of integers with scale a power of two, "
                             f"got {in_code!r}")
        self.in_code = in_code
        self.in_offset = in_code[1]
        lo, hi = self.in_range = code_range(self.in_shape, in_code, in_range)
        xmax = max(abs(lo), abs(hi))
        # the codebooks' worst case: every weight at its largest magnitude
        self.weight_max = pow2_codebook_max(self.terms, code_bits, exponent_offset)
        bound = self.n * xmax * self.weight_max
        self.acc_shape = signed(bits_for(bound) + 1)
        wq = self.weights
        self.dot_range = dot_range(wq, lo, hi)
        self.n_thresholds, self.ge, self.invert, self.thr_shape, self.out_elem = \
            dot_thresholds(thresholds, direction, self.m, self.dot_range)
        out_elem = self.out_elem
        self.pipelined = bool(pipelined)
        # a register after the term select and after each level of the adder tree
        self.partial_stages = pipelined_sum_stages(self._n_terms()) if self.pipelined else 0
        wiring.Component.__init__(self, self._members({
            "i": In(stream.Signature(data.ArrayLayout(self.in_shape, simd))),
            "o": Out(stream.Signature(data.ArrayLayout(out_elem, pe))),
        }))

    @property
    def weight_bits(self):
        """Weight memory bits per (PE, SIMD lane): ``T`` codes of ``B`` bits."""
        return self.terms * self.code_bits

    def weight_words(self):
        """Weight memory contents: word ``f*SF + s`` holds, at bits ``((p*SIMD + k)*T + t)*B``,
        the code of term ``t`` of ``W[f*PE + p, s*SIMD + k]``."""
        b, t_ = self.code_bits, self.terms
        # [f, p, t, s, k] -> per word (f, s): p, k, t from the lowest bits up
        c = self.codes.reshape(self.nf, self.pe, t_, self.sf, self.simd).transpose(0, 3, 1, 4, 2)
        c = c.reshape(self.nf * self.sf, self.pe * self.simd * t_)
        words = []
        for row in c:
            word = 0
            for i, v in enumerate(row.tolist()):
                word |= v << (i * b)
            words.append(word)
        return words

    def shift_of(self, t, j):
        """The left shift index ``j`` of term ``t`` selects: ``E - t - (j - 1)`` (None if negative)."""
        s = self.exponent_offset - t - (j - 1)
        return s if s >= 0 else None

    # -- datapath (MVTU hooks) -------------------------------------------------------------

    def _inputs(self, m, raw):
        """Decode each element once and form its shifted copies ``x << s`` (s = 0..E), shared by
        every PE: a list over the SIMD elements of ``{s: value}``."""
        iw = self.in_shape.width
        scale, offset = self.in_code
        copies = []
        for k in range(self.simd):
            x = raw[k * iw:(k + 1) * iw]
            x = x.as_signed() if self.in_shape.signed else x
            if scale != 1:
                x = x << (scale.bit_length() - 1)
            if offset:
                x = x + offset
            copies.append({s: x << s for s in range(self.exponent_offset + 1)})
        return copies

    def _select(self, copies, k, t, j):
        """The copy index ``j`` of term ``t`` selects for element ``k`` (index 0: the constant 0):
        a tree of two-way muxes over the shared copies, one level per index bit (18% fewer LUTs
        in Yosys' ECP5 mapping than one flat many-way mux)."""
        top = (1 << (self.code_bits - 1)) - 1
        options = [Const(0, 1)] + [copies[k][s] if (s := self.shift_of(t, jj)) is not None else Const(0, 1)
                                   for jj in range(1, top + 1)]
        for bit in range(self.code_bits - 1):
            options = [Mux(j[bit], options[2 * i + 1], options[2 * i]) for i in range(len(options) // 2)]
        return options[0]

    def _terms(self, m, p, copies, wbits):
        """PE ``p``'s addends of one beat: per element and term the copy its index selects,
        complemented if the term is negative, and the corrections that complete the negations.

        Unsigned inputs: the complement stays within each term's copy width ``W_t`` (no sign
        extension through the adder tree): ``-v = (2^W_t - 1 - v) + 1 - 2^W_t``, so term ``t``'s
        lanes add to ``sum(u) + c_t - c_t * 2^W_t`` with ``c_t`` its count of negative terms.
        Signed inputs: the copies are sign-extended by one bit, complemented in full, and the
        count of negative terms added once."""
        b = self.code_bits
        fields = [[wbits[(k * self.terms + t) * b:(k * self.terms + t + 1) * b] for t in range(self.terms)]
                  for k in range(self.simd)]
        if self.in_range[0] < 0:
            vals, negs = [], []
            for k in range(self.simd):
                for t in range(self.terms):
                    j, neg = fields[k][t][:b - 1], fields[k][t][b - 1]
                    sel = self._select(copies, k, t, j)
                    ext = sel if sel.shape().signed else Cat(sel, Const(0, 1)).as_signed()
                    vals.append(Mux(neg, ~ext, ext))
                    negs.append(neg)
            return vals + [popcount(Cat(*negs))]
        vals, corrections = [], []
        for t in range(self.terms):
            us, negs = [], []
            for k in range(self.simd):
                j, neg = fields[k][t][:b - 1], fields[k][t][b - 1]
                sel = self._select(copies, k, t, j)
                us.append(Mux(neg, ~sel, sel))
                negs.append(neg)
            width = max(len(u) for u in us)
            vals += [Cat(u, Const(0, width - len(u))) if len(u) < width else u for u in us]
            count = Cat(popcount(Cat(*negs)), Const(0, 1)).as_signed()
            corrections.append(count - (count << width))
        return vals + corrections

    def _n_terms(self):
        return self.simd * self.terms + (1 if self.in_range[0] < 0 else self.terms)

    def _partial(self, m, p, copies, wbits):
        """PE ``p``'s beat: the adder tree over :meth:`_terms`. Pipelined (the default): a register
        after the term select and after every adder level, so every adder is a two-input carry
        chain (Yosys merges a combinational tree into one multi-operand adder of LUT full adders,
        about 3x the LUTs); :attr:`partial_stages` registers of latency, no cycle of throughput."""
        terms = self._terms(m, p, copies, wbits)
        return self._pipelined_sum(m, terms, f"pe{p}") if self.pipelined else sum_tree(terms)
