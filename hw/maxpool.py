"""Streaming max-pool: non-overlapping ``K x K`` windows (stride ``S = K``), no padding,
floor mode (trailing rows/columns that do not fill a window are dropped, like
``torch.nn.functional.max_pool2d``'s default).

Computes ``out[oy, ox, c] = max over ky, kx < K of in[oy*K + ky, ox*K + kx, c]`` for a
channels-last ``[H, W, C]`` map, giving ``[H//K, W//K, C]``. With ``binary`` the elements
are bits (1 = +1, 0 = -1) and the maximum of ``{-1, +1}`` values is the OR of their bits;
otherwise it is the integer maximum in the element shape's signedness (unsigned for
``unsigned(n)`` activations).

Stream interface
  ``i``: ``LANES`` elements per beat, the map flattened row-major, channels innermost
  (element ``k`` of a beat follows ``k-1``); one frame = ``H*W*C/LANES`` beats.
  ``o``: ``LANES`` elements per beat, the pooled map in the same order; one frame =
  ``(H//K)*(W//K)*C/LANES`` beats. ``LANES`` must divide ``C``.

FINN-style datapath: a buffer of partial maxima for one output row (``W//K * C``
elements: a ``lib.memory`` of depth ``(W//K)*C/LANES``, word = one beat) is updated as
the ``K`` input rows of a window row stream past: the first beat of a window
(``ky = kx = 0``) overwrites its word, the others fold in with ``max``; the beat at
``ky = kx = K-1`` completes the window and goes to the output register instead. Two
stages: accept the beat and issue the buffer read (the read port is transparent to the
write port, so a read-modify-write of the word the previous beat is writing sees its
value) -> combine, write back or emit. The pipeline moves unless a completed window
finds the output register full and not taken, so back-pressure loses or duplicates
nothing; with ``o.ready`` high it accepts one beat per cycle, frames back to back:
:attr:`MaxPool.cycles_per_frame` = ``H*W*C/LANES``.

A frame's last output beat is held back (``o.valid`` low) until the frame's trailing
dropped input beats, if any, have been accepted, so a frame's output never completes
while part of its input is still waiting upstream.
"""

from amaranth.hdl import Module, Mux, Shape, Signal
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import mul_const


def _positive(what, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")


class MaxPool(wiring.Component):
    """Streaming non-overlapping max-pool; see the module docstring.

    Parameters
    ----------
    elem_shape : Amaranth shape of one element (``unsigned(1)`` when ``binary``)
    height, width, channels : input map ``[H, W, C]``
    kernel : ``K`` (square window)
    lanes : elements per beat, in and out; must divide ``channels``
    binary : elements are bits encoding -1/+1; the maximum is the OR
    stride : must equal ``kernel`` (default)
    """

    def __init__(self, elem_shape, height, width, channels, kernel, lanes=1, binary=False, *,
                 stride=None):
        try:
            shape = Shape.cast(elem_shape)
        except TypeError as e:
            raise ValueError(f"elem_shape must be an Amaranth shape, got {elem_shape!r}") from e
        for what, v in (("height", height), ("width", width), ("channels", channels),
                        ("kernel", kernel), ("lanes", lanes)):
            _positive(what, v)
        if stride is None:
            stride = kernel
        _positive("stride", stride)
        if stride != kernel:
            raise ValueError(f"stride={stride} != kernel={kernel}: only non-overlapping pooling "
                             f"(stride equal to the kernel) is supported")
        if channels % lanes:
            raise ValueError(f"lanes={lanes} does not divide channels={channels}: a beat must be "
                             f"one channel block of one pixel")
        if height < kernel or width < kernel:
            raise ValueError(f"output size {height // kernel}x{width // kernel} < 1: a {kernel}x{kernel} "
                             f"window does not fit the {height}x{width} map")
        if binary and (shape.width != 1 or shape.signed):
            raise ValueError(f"binary max-pool needs 1-bit unsigned elements, got {shape!r}")
        self.elem_shape, self.binary = shape, bool(binary)
        self.height, self.width, self.channels = height, width, channels
        self.kernel, self.stride, self.lanes = kernel, stride, lanes
        self.out_height, self.out_width = height // kernel, width // kernel
        self.blocks = channels // lanes
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(shape, lanes))),
            "o": Out(stream.Signature(data.ArrayLayout(shape, lanes))),
        })

    @property
    def out_shape(self):
        return self.out_height, self.out_width, self.channels

    @property
    def in_beats(self):
        return self.height * self.width * self.blocks

    @property
    def out_beats(self):
        return self.out_height * self.out_width * self.blocks

    @property
    def cycles_per_frame(self):
        """Steady-state frame interval: one input beat per cycle."""
        return self.in_beats

    def elaborate(self, platform):
        m = Module()
        H, W, K, CB = self.height, self.width, self.kernel, self.blocks
        OH, OW, lanes = self.out_height, self.out_width, self.lanes
        layout = data.ArrayLayout(self.elem_shape, lanes)
        trailing = H % K != 0 or W % K != 0

        m.submodules.partial = buf = memory.Memory(shape=layout, depth=OW * CB, init=[])
        wr = buf.write_port()
        rd = buf.read_port(transparent_for=(wr,))

        # ---- stage A: input position counters, buffer read
        cb = Signal(range(CB))
        x = Signal(range(W))
        kx = Signal(range(K))
        ox = Signal(range(OW + 1))           # OW: trailing columns
        y = Signal(range(H))
        ky = Signal(range(K))
        last_cb, last_x, last_y = cb == CB - 1, x == W - 1, y == H - 1
        drop = (x >= OW * K) | (y >= OH * K)

        advance = Signal()
        a_fire = Signal()
        m.d.comb += [
            self.i.ready.eq(advance),
            a_fire.eq(self.i.valid & advance),
            rd.addr.eq(Mux(drop, 0, mul_const(ox, CB) + cb)),
            rd.en.eq(advance),
        ]
        with m.If(a_fire):
            m.d.sync += cb.eq(Mux(last_cb, 0, cb + 1))
            with m.If(last_cb):
                m.d.sync += [
                    x.eq(Mux(last_x, 0, x + 1)),
                    kx.eq(Mux(last_x | (kx == K - 1), 0, kx + 1)),
                    ox.eq(Mux(last_x, 0, Mux(kx == K - 1, ox + 1, ox))),
                ]
                with m.If(last_x):
                    m.d.sync += [
                        y.eq(Mux(last_y, 0, y + 1)),
                        ky.eq(Mux(last_y | (ky == K - 1), 0, ky + 1)),
                    ]

        # ---- stage B: combine with the partial maximum; write back or emit
        b_valid = Signal()
        b_data = Signal(layout)
        b_addr = Signal(range(OW * CB))
        b_first, b_emit, b_drop = Signal(), Signal(), Signal()
        b_last_out, b_last_in = Signal(), Signal()
        with m.If(advance):
            m.d.sync += b_valid.eq(self.i.valid)
            with m.If(self.i.valid):
                m.d.sync += [
                    b_data.eq(self.i.payload),
                    b_addr.eq(rd.addr),
                    b_first.eq((ky == 0) & (kx == 0)),
                    b_emit.eq((ky == K - 1) & (kx == K - 1) & ~drop),
                    b_drop.eq(drop),
                    b_last_out.eq((y == OH * K - 1) & (x == OW * K - 1) & last_cb),
                    b_last_in.eq(last_y & last_x & last_cb),
                ]

        result = Signal(layout)
        if self.binary:
            m.d.comb += result.as_value().eq(
                Mux(b_first, b_data.as_value(), b_data.as_value() | rd.data.as_value()))
        else:
            for k in range(lanes):
                a, b = b_data[k], rd.data[k]
                m.d.comb += result[k].eq(Mux(b_first | (a > b), a, b))
        b_fire = advance & b_valid
        m.d.comb += [
            wr.addr.eq(b_addr),
            wr.data.eq(result),
            wr.en.eq(b_fire & ~b_drop & ~b_emit),
        ]

        # ---- output register (held while a frame's trailing input is still arriving)
        out_full = Signal()
        hold = Signal()
        m.d.comb += [
            self.o.valid.eq(out_full & ~hold),
            advance.eq(~(b_valid & b_emit) | ~out_full | (self.o.valid & self.o.ready)),
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += out_full.eq(0)
        with m.If(b_fire & b_emit):
            m.d.sync += [out_full.eq(1), self.o.payload.eq(result)]
        if trailing:
            with m.If(b_fire & b_emit & b_last_out):
                m.d.sync += hold.eq(1)
            with m.If(b_fire & b_last_in):
                m.d.sync += hold.eq(0)
        return m
