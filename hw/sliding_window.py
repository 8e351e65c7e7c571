"""Sliding-window (convolution input) generator: a channels-last feature map in, the
windows of a ``K x K`` convolution with stride ``S`` and zero-/value-padding ``P`` out.

Computes, for every output pixel ``(oy, ox)`` in row-major order
(``OH = (H + 2P - K)//S + 1``, likewise ``OW``), the window elements in the order
``(ky, kx, c)`` (channels innermost, then ``kx``, then ``ky``):
``input[oy*S + ky - P, ox*S + kx - P, c]``, or ``pad_value`` where that position lies
outside the ``H x W`` map. This is the order of ``torch.nn.functional.unfold`` permuted
to ``(ky, kx, c)`` and matches convolution weights stored as ``[Cout][ky][kx][Cin]``, so
an MVTU with ``N = K*K*C`` consumes the output directly (one vector per output pixel).

Stream interface
  ``i``: ``SIMD`` elements per beat; one frame = ``H*W*C/SIMD`` beats of the map
  flattened row-major, channels innermost (element ``k`` of a beat follows ``k-1``).
  ``o``: ``SIMD`` elements per beat; one frame = ``OH*OW*K*K*C/SIMD`` beats, windows in
  the order above. ``SIMD`` must divide ``C``, so a beat is one channel block of one pixel.

Line buffer: one ``lib.memory`` of ``R`` input rows (default ``R = 2K + S``), word =
``SIMD`` elements (one channel block of one pixel), depth ``R*W*C/SIMD``. Global input
row ``g`` (counted across frames) lives in slot ``g mod R``; padding is never stored,
the reader substitutes ``pad_value`` for out-of-bounds positions.

Synchronization (two counters, both in the reader's frame coordinates):
``avail`` = rows of the reader's current frame completely written (it exceeds ``H`` once
the writer is into the next frame), ``rel`` = rows of that frame the reader has released.
* The writer accepts a beat whenever ``avail - rel < R`` (its slot's previous row has
  been released): one beat per cycle. ``avail - rel`` is kept in a register of its own
  (``occupied``), so ``ready`` is one comparison of a register.
* The reader issues one output beat per cycle whenever ``avail >= min(oy*S - P + K, H)``
  (every row its current output row touches is complete) and the output is ready.
  Finishing output row ``oy`` releases the rows below ``(oy+1)*S - P``; finishing the
  frame releases the rest and shifts ``avail`` by ``-H`` into the next frame.
* The frame's last output beat waits for ``avail >= H``: bottom rows no window touches
  (e.g. ``H=6, K=3, S=2``, or ``S > K``) are still consumed before the frame's output ends, so a frame's output
  never completes while part of its input is still waiting upstream.
Frames follow back to back; with ``R = 2K + S`` the writer fills the next frame's first
rows while the last windows of the current frame are read, so in steady state the
frame interval is :attr:`SlidingWindow.cycles_per_frame` =
``max(OH*OW*K*K*C/SIMD, H*W*C/SIMD)`` (plus a few cycles).

The read side is a two-stage pipeline (issue address -> memory output), frozen as a
whole by back-pressure on ``o`` (the read enable follows it), so nothing is lost,
duplicated or reordered. The read port is not transparent; a slot is released in the
cycle its last read is issued, so the writer's next write there lands a cycle later.
"""

from amaranth.hdl import Array, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out


def _positive(what, v, minimum=1):
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what} must be {kind}, got {v!r}")


class SlidingWindow(wiring.Component):
    """Convolution input generator; see the module docstring.

    Parameters
    ----------
    elem_shape : Amaranth shape of one element (e.g. ``unsigned(1)`` for binary activations)
    height, width, channels : input map ``[H, W, C]``
    kernel : ``K`` (square window)
    stride : ``S >= 1``
    padding : ``P >= 0`` on all four sides
    pad_value : the value padded positions carry (must fit ``elem_shape``)
    simd : elements per beat, in and out; must divide ``channels``
    rows : line-buffer rows ``R`` (default ``2*K + S``; at least ``K + 1``)
    """

    def __init__(self, elem_shape, height, width, channels, kernel, stride=1, padding=0,
                 pad_value=0, simd=1, *, rows=None):
        try:
            shape = Shape.cast(elem_shape)
        except TypeError as e:
            raise ValueError(f"elem_shape must be an Amaranth shape, got {elem_shape!r}") from e
        for what, v in (("height", height), ("width", width), ("channels", channels),
                        ("kernel", kernel), ("stride", stride), ("simd", simd)):
            _positive(what, v)
        _positive("padding", padding, 0)
        if channels % simd:
            raise ValueError(f"simd={simd} does not divide channels={channels}: a beat must be "
                             f"one channel block of one pixel")
        oh = (height + 2 * padding - kernel) // stride + 1
        ow = (width + 2 * padding - kernel) // stride + 1
        if height + 2 * padding < kernel or width + 2 * padding < kernel:
            raise ValueError(f"output size {max(oh, 0)}x{max(ow, 0)} < 1: a {kernel}x{kernel} kernel "
                             f"does not fit the {height}x{width} map with padding {padding}")
        lo, hi = (-(1 << (shape.width - 1)), (1 << (shape.width - 1)) - 1) if shape.signed \
            else (0, (1 << shape.width) - 1)
        if not isinstance(pad_value, int) or not lo <= pad_value <= hi:
            raise ValueError(f"pad_value={pad_value!r} does not fit the element shape {shape!r} "
                             f"({lo}..{hi})")
        if rows is None:
            rows = 2 * kernel + stride
        _positive("rows", rows)
        if rows < kernel + 1:
            raise ValueError(f"rows={rows}: the line buffer needs at least kernel+1={kernel + 1} rows")
        self.elem_shape = shape
        self.height, self.width, self.channels = height, width, channels
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.pad_value, self.simd, self.rows = pad_value, simd, rows
        self.out_height, self.out_width = oh, ow
        self.blocks = channels // simd
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(shape, simd))),
            "o": Out(stream.Signature(data.ArrayLayout(shape, simd))),
        })

    @property
    def out_shape(self):
        """``(OH, OW, K*K*C)``: the output as a map of window vectors."""
        return self.out_height, self.out_width, self.kernel * self.kernel * self.channels

    @property
    def in_beats(self):
        return self.height * self.width * self.blocks

    @property
    def out_beats(self):
        return self.out_height * self.out_width * self.kernel * self.kernel * self.blocks

    @property
    def cycles_per_frame(self):
        """Steady-state frame interval: the busier of the reader and the writer."""
        return max(self.out_beats, self.in_beats)

    def elaborate(self, platform):
        m = Module()
        H, W, K, S, P, R = self.height, self.width, self.kernel, self.stride, self.padding, self.rows
        CB, OH, OW = self.blocks, self.out_height, self.out_width
        row_words = W * CB
        depth = R * row_words
        word_w = self.simd * self.elem_shape.width

        m.submodules.lines = lines = memory.Memory(shape=unsigned(word_w), depth=depth, init=[])
        wr = lines.write_port()
        rd = lines.read_port()

        # ---- shared row accounting (reader's frame coordinates)
        avail = Signal(signed((H + R + 2).bit_length() + 1))   # rows of the frame written
        # avail - rel, kept in a register; negative while the reader has released rows that no
        # window touches before they are written (S > K, or a padded first output row)
        occupied = Signal(signed(max(H, R).bit_length() + 2))

        # ---- writer: one beat per cycle into slot (global row mod R)
        waddr = Signal(range(depth))
        wword = Signal(range(row_words))
        w_fire = Signal()
        row_done = Signal()
        m.d.comb += [
            self.i.ready.eq(occupied < R),
            w_fire.eq(self.i.valid & self.i.ready),
            row_done.eq(w_fire & (wword == row_words - 1)),
            wr.addr.eq(waddr),
            wr.data.eq(self.i.payload.as_value()),
            wr.en.eq(w_fire),
        ]
        with m.If(w_fire):
            m.d.sync += [
                waddr.eq(Mux(waddr == depth - 1, 0, waddr + 1)),
                wword.eq(Mux(wword == row_words - 1, 0, wword + 1)),
            ]

        # ---- reader, stage A: window counters and address
        # Everything the read address, the pad test and the row wait need is kept in
        # registers, updated from the counters' wrap flags (no carry chain of one feeds another
        # within a cycle): x = x_left + kx and y = y_top + ky, the line-buffer word offsets
        # row_base = slot(y) * W*CB and xcb = x*CB + cb, and need_row = min(y_top + K, H).
        cb = Signal(range(CB))
        kx = Signal(range(K))
        ky = Signal(range(K))
        ox = Signal(range(OW))
        oy = Signal(range(OH))
        coord = signed(max(H, W, P, K, S).bit_length() + 3)
        x_left = Signal(coord, init=-P)      # ox*S - P
        y_top = Signal(coord, init=-P)       # oy*S - P
        x = Signal(coord, init=-P)           # x_left + kx
        y = Signal(coord, init=-P)           # y_top + ky
        base_shape = range(depth)
        top_base = Signal(base_shape, init=((-P) % R) * row_words)   # slot(y_top) * row_words
        row_base = Signal(base_shape, init=((-P) % R) * row_words)   # slot(y) * row_words
        offs = signed(((W + P + S + 1) * CB).bit_length() + 2)
        xl_cb = Signal(offs, init=-P * CB)   # x_left * CB
        xcb = Signal(offs, init=-P * CB)     # x * CB + cb
        need_row = Signal(coord, init=min(K - P, H))   # rows output row oy waits for
        frame_shift = (H - (OH - 1) * S) % R          # top slot: last output row -> next frame's first

        pad = Signal()
        m.d.comb += pad.eq((x < 0) | (x >= W) | (y < 0) | (y >= H))

        last_cb, last_kx, last_ky = cb == CB - 1, kx == K - 1, ky == K - 1
        last_ox, last_oy = ox == OW - 1, oy == OH - 1
        last_beat = last_cb & last_kx & last_ky & last_ox & last_oy

        advance = Signal()
        valid_a = Signal()
        fire_a = Signal()
        addr = Signal(base_shape)
        m.d.comb += [
            advance.eq(~self.o.valid | self.o.ready),
            # the frame's last beat waits for every row of the frame (see the module docstring)
            valid_a.eq(Mux(last_beat, avail >= H, avail >= need_row)),
            fire_a.eq(advance & valid_a),
            addr.eq(row_base + xcb),
            rd.addr.eq(Mux(pad, 0, addr)),
            rd.en.eq(advance),
        ]

        def wrap(v):
            return Mux(v >= depth, v - depth, v)

        x_left_next = Mux(last_ox, -P, x_left + S)
        xl_cb_next = Mux(last_ox, -P * CB, xl_cb + S * CB)
        y_top_next = Mux(last_oy, -P, y_top + S)
        top_base_next = wrap(top_base + Mux(last_oy, frame_shift * row_words, (S % R) * row_words))
        need_next = Mux(last_oy, min(K - P, H), Mux(y_top + (S + K) > H, H, y_top + (S + K)))

        with m.If(fire_a):
            m.d.sync += [cb.eq(Mux(last_cb, 0, cb + 1)), xcb.eq(xcb + 1)]
            with m.If(last_cb):
                m.d.sync += [kx.eq(Mux(last_kx, 0, kx + 1)), x.eq(x + 1)]
                with m.If(last_kx):
                    m.d.sync += [ky.eq(Mux(last_ky, 0, ky + 1)), y.eq(y + 1),
                                 row_base.eq(wrap(row_base + row_words)),
                                 x.eq(Mux(last_ky, x_left_next, x_left)),
                                 xcb.eq(Mux(last_ky, xl_cb_next, xl_cb))]
                    with m.If(last_ky):
                        m.d.sync += [ox.eq(Mux(last_ox, 0, ox + 1)), x_left.eq(x_left_next),
                                     xl_cb.eq(xl_cb_next),
                                     y.eq(Mux(last_ox, y_top_next, y_top)),
                                     row_base.eq(Mux(last_ox, top_base_next, top_base))]
                        with m.If(last_ox):
                            m.d.sync += [oy.eq(Mux(last_oy, 0, oy + 1)), y_top.eq(y_top_next),
                                         top_base.eq(top_base_next), need_row.eq(need_next)]

        row_end = fire_a & last_cb & last_kx & last_ky & last_ox
        frame_end = row_end & last_oy

        # releases: rows below (oy+1)*S - P once output row oy is done, all at frame end. So
        # rel = clamp(oy*S - P, 0, H) is a function of the output row alone, and the rows each
        # output row's end releases are a constant table over oy. occupied follows avail - rel:
        # + a written row, - the rows released (at the frame's end, the rest of the frame, as
        # avail shifts by -H and rel restarts at 0)
        def rel_at(row):
            return 0 if row == 0 else min(max(row * S - P, 0), H)
        row_release = [rel_at(r + 1) - rel_at(r) for r in range(OH)]
        release = Signal(range(max(row_release) + 1), init=row_release[0])   # at the end of output row oy
        table = Array(Const(v, release.shape()) for v in row_release[1:] + [row_release[0]])
        with m.If(row_end):
            m.d.sync += release.eq(Mux(last_oy, row_release[0], table[oy]))
        released = Mux(frame_end, H - rel_at(OH - 1), Mux(row_end, release, 0))
        m.d.sync += occupied.eq(occupied + row_done - released)
        avail_inc = Signal.like(avail)
        m.d.comb += avail_inc.eq(avail + row_done)
        m.d.sync += avail.eq(Mux(frame_end, avail_inc - H, avail_inc))   # the select last, after both sums

        # ---- reader, stage B: memory output (or the pad value) is the output beat
        pad_b = Signal()
        with m.If(advance):
            m.d.sync += [self.o.valid.eq(valid_a), pad_b.eq(pad)]
        pad_word = Const(sum((self.pad_value & ((1 << self.elem_shape.width) - 1))
                             << (k * self.elem_shape.width) for k in range(self.simd)), word_w)
        m.d.comb += self.o.payload.as_value().eq(Mux(pad_b, pad_word, rd.data))
        return m
