"""Board-level top: the accelerator behind a UART (protocol: docs/board-protocol.md).

:class:`UartAccelerator` is the pin-independent core (``rx``/``tx`` lines and status
outputs) that simulations drive; :class:`BoardTop` puts it on a board's UART and LEDs;
:func:`board_platform` names the supported amaranth-boards platforms.

Data path::

    rx ─▶ UARTReceiver ─▶ byte FIFO ─▶ command parser ─▶ pixel packer ─▶ Accelerator ─▶ result
                                           │  │ ('W' bytes) ───────────▶ weights ▲           │
                                           │ reply order FIFO                              │
                                           └──────────────▶ reply serializer ◀─────────────┘
                                                                   │
                                                      tx ◀─ UARTTransmitter

Run-time weights (a design with ``"ram"`` layers): ``'W'`` waits until no reply is
pending (so no frame is in the pipeline), restarts the accelerator's weight load and
passes the next ``weight_bytes`` bytes to its ``weights`` stream; ``'K'`` follows once
every loaded layer is filled. A second ``'W'`` reloads the same way. Until a load has
completed, ``'I'`` images are read and answered ``'E' 'I'`` without being computed; a load
whose bytes stop arriving (``timeout_bits``) is answered ``'E' 'W'`` and leaves the
weights unloaded.
"""

from amaranth.build import ResourceError
from amaranth.hdl import Cat, Elaboratable, Module, Mux, Signal, Value
from amaranth.lib import io, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from boards.protocol import CMD_IMAGE, CMD_WEIGHTS, REPLY_ERROR, REPLY_LOADED, REPLY_RESULT, BoardFormat
from boards.uart import UARTReceiver, UARTTransmitter, check_divisor, uart_divisor
from hw.network import Accelerator, frame_cycles
from qnnfab.errors import QnnfabError

DEFAULT_TIMEOUT_BITS = 1 << 14      # an image whose bytes pause this long is abandoned (0.14 s at 115200)
# reply order entries: send a result / 'E' <byte> / drop a result, 'E' 'I' / 'K' once the weights are in
_RESULT, _ERROR, _DROP, _LOADED = 0, 1, 2, 3


class UartAccelerator(wiring.Component):
    """The accelerator for ``qmd``/``folding`` behind an 8N1 UART at ``divisor`` clock
    cycles per bit, speaking the protocol of :mod:`boards.protocol`.

    Ports: ``rx`` (serial in, idle high), ``tx`` (serial out); status for LEDs: ``busy``
    (an image or weights are being received or replies are pending), ``frames`` (``'R'``
    replies sent, wrapping), ``errors`` (line errors, i.e. framing errors and receive
    overruns, plus ``'E'`` replies; saturating at 255), ``loaded`` (images can be
    computed: always 1 without run-time weights, else after a completed ``'W'``).

    ``timeout_bits``: an image whose next byte does not arrive within this many bit times
    is completed with zeros, its result dropped and answered ``'E' 'I'``; a weight load
    that stalls as long is abandoned and answered ``'E' 'W'``.
    ``fifo_depth``: bytes buffered between the receiver and the parser.
    """

    def __init__(self, qmd, folding, divisor, *, timeout_bits=DEFAULT_TIMEOUT_BITS, fifo_depth=16):
        check_divisor(divisor)
        if isinstance(timeout_bits, bool) or not isinstance(timeout_bits, int) or timeout_bits < 20:
            raise ValueError(f"timeout_bits must be an integer >= 20 bit times, not {timeout_bits!r}")
        if isinstance(fifo_depth, bool) or not isinstance(fifo_depth, int) or fifo_depth < 2:
            raise ValueError(f"fifo_depth must be an integer >= 2, not {fifo_depth!r}")
        self.accelerator = Accelerator(qmd, folding)
        self.format = fmt = BoardFormat.from_stages(qmd, self.accelerator.stages)
        self.divisor, self.timeout_bits, self.fifo_depth = divisor, timeout_bits, fifo_depth
        where = str(qmd.path / "qmd.json") if qmd.path else qmd.name
        if fmt.classes > 256:
            raise QnnfabError(f"{fmt.classes} classes do not fit the reply's one class byte", where=where)
        self.lanes = self.accelerator.stages[0].in_lanes
        if fmt.frame_bytes % self.lanes:
            raise QnnfabError(f"{fmt.frame_bytes} input values are not a whole number of "
                              f"{self.lanes}-value beats", where=where)
        # the UART must be the bottleneck: a slower accelerator back-pressures the byte FIFO
        # until the receiver drops bytes (a UART has no flow control)
        self.frame_cycles = frame_cycles(self.accelerator.stages)
        self.uart_frame_cycles = 10 * divisor * (1 + fmt.frame_bytes)
        if max(self.frame_cycles, 10 * divisor * fmt.result_bytes) > self.uart_frame_cycles:
            raise QnnfabError(f"the accelerator needs {self.frame_cycles} cycles per frame but the UART delivers "
                              f"one every {self.uart_frame_cycles} cycles at {divisor} cycles per bit, so "
                              "pixels would be lost: lower the baud or fold for more throughput",
                              where="divisor")
        super().__init__({
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "busy": Out(1),
            "frames": Out(16),
            "errors": Out(8),
            "loaded": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        fmt, lanes = self.format, self.lanes
        acc = m.submodules.accelerator = self.accelerator
        rx = m.submodules.uart_rx = UARTReceiver(self.divisor)
        tx = m.submodules.uart_tx = UARTTransmitter(self.divisor)
        fifo = m.submodules.rx_fifo = SyncFIFOBuffered(width=8, depth=self.fifo_depth)
        order = m.submodules.reply_order = SyncFIFOBuffered(width=10, depth=8)
        m.d.comb += [rx.rx.eq(self.rx), self.tx.eq(tx.tx)]
        wiring.connect(m, rx.o, fifo.w_stream)
        byte = fifo.r_stream

        # ---- pixel packer: bytes -> lanes-wide beats (shift register; byte 0 ends in lane 0)
        beat = Signal(8 * lanes)
        lane = Signal(range(lanes))
        push, push_data = Signal(), Signal(8)
        # a byte enters only while no complete beat waits: the parser then does not depend on the
        # accelerator's ready chain combinationally (the UART is far slower than a cycle per byte)
        can_push = ~acc.pixels.valid
        m.d.comb += acc.pixels.payload.eq(beat)
        with m.If(acc.pixels.valid & acc.pixels.ready):
            m.d.sync += acc.pixels.valid.eq(0)
        with m.If(push):
            m.d.sync += beat.eq(Cat(beat[8:], push_data) if lanes > 1 else push_data)
            with m.If(lane == lanes - 1):
                m.d.sync += [lane.eq(0), acc.pixels.valid.eq(1)]
            with m.Else():
                m.d.sync += lane.eq(lane + 1)

        # ---- command parser
        count = Signal(range(fmt.frame_bytes))
        last = count == fmt.frame_bytes - 1
        timeout = self.timeout_bits * self.divisor
        idle = Signal(range(timeout))
        entry_kind, entry_byte = Signal(2), Signal(8)
        m.d.comb += order.w_data.eq(Cat(entry_byte, entry_kind))
        receiving = Signal()
        has_weights = fmt.weight_bytes > 0
        weights_ok = Signal(init=0 if has_weights else 1)   # a load completed: images are computed
        refuse = Signal()           # the image being received came before the weights: read it, answer 'E' 'I'
        step = Signal()             # one more byte of the image (received or padding) is taken
        if has_weights:
            wcount = Signal(range(fmt.weight_bytes))
            wlast = wcount == fmt.weight_bytes - 1
        with m.FSM():
            with m.State("COMMAND"):
                m.d.comb += byte.ready.eq(order.w_rdy)
                with m.If(byte.valid & byte.ready):
                    with m.If(byte.payload == CMD_IMAGE):
                        m.d.sync += [count.eq(0), idle.eq(0), refuse.eq(~weights_ok)]
                        m.next = "PIXELS"
                    if has_weights:
                        with m.Elif(byte.payload == CMD_WEIGHTS):
                            m.next = "WEIGHTS_WAIT"
                    with m.Else():
                        m.d.comb += [order.w_en.eq(1), entry_kind.eq(_ERROR), entry_byte.eq(byte.payload)]
            with m.State("PIXELS"):
                m.d.comb += [receiving.eq(1), push_data.eq(byte.payload),
                             byte.ready.eq((can_push | refuse) & (~last | order.w_rdy)),
                             step.eq(byte.valid & byte.ready)]
                with m.If(byte.valid):
                    m.d.sync += idle.eq(0)
                with m.Elif(idle == timeout - 1):
                    m.next = "PAD"
                with m.Else():
                    m.d.sync += idle.eq(idle + 1)
                with m.If(step & last):
                    m.d.comb += [order.w_en.eq(1), entry_kind.eq(Mux(refuse, _ERROR, _RESULT)),
                                 entry_byte.eq(CMD_IMAGE)]
                    m.next = "COMMAND"
            with m.State("PAD"):          # the host stopped mid-image: finish it with zeros
                m.d.comb += [receiving.eq(1), push_data.eq(0),
                             step.eq((can_push | refuse) & (~last | order.w_rdy))]
                with m.If(step & last):
                    m.d.comb += [order.w_en.eq(1), entry_kind.eq(Mux(refuse, _ERROR, _DROP)),
                                 entry_byte.eq(CMD_IMAGE)]
                    m.next = "COMMAND"
            if has_weights:
                with m.State("WEIGHTS_WAIT"):   # no reply pending = no frame in the pipeline
                    m.d.comb += receiving.eq(1)
                    with m.If(~order.r_rdy):
                        m.d.comb += acc.weights_reload.eq(1)
                        m.d.sync += [weights_ok.eq(0), wcount.eq(0), idle.eq(0)]
                        m.next = "WEIGHTS"
                with m.State("WEIGHTS"):
                    room = ~wlast | order.w_rdy
                    m.d.comb += [receiving.eq(1), acc.weights.payload.eq(byte.payload),
                                 acc.weights.valid.eq(byte.valid & room), byte.ready.eq(acc.weights.ready & room)]
                    with m.If(byte.valid & byte.ready):
                        m.d.sync += [wcount.eq(wcount + 1), idle.eq(0)]
                        with m.If(wlast):
                            m.d.comb += [order.w_en.eq(1), entry_kind.eq(_LOADED)]
                            m.d.sync += weights_ok.eq(1)
                            m.next = "COMMAND"
                    with m.Elif(byte.valid):
                        m.d.sync += idle.eq(0)
                    with m.Elif(idle == timeout - 1):     # the host stopped mid-load: give up, 'E' 'W'
                        with m.If(order.w_rdy):
                            m.d.comb += [order.w_en.eq(1), entry_kind.eq(_ERROR), entry_byte.eq(CMD_WEIGHTS)]
                            m.next = "COMMAND"
                    with m.Else():
                        m.d.sync += idle.eq(idle + 1)
        m.d.comb += push.eq(step & ~refuse)
        with m.If(step):
            m.d.sync += count.eq(count + 1)

        # ---- reply serializer: one reply per order entry, in order
        head_byte, head_kind = order.r_data[:8], order.r_data[8:]
        is_result = head_kind == _RESULT
        is_loaded = head_kind == _LOADED
        needs_result = is_result | (head_kind == _DROP)
        weights_in = acc.weights_loaded if has_weights else 1
        # the result waits in a register, so the accelerator's ready chain starts at a flip-flop
        # instead of running through the serializer and the reply FIFO
        res = Signal(acc.result.payload.shape())
        res_valid = Signal()
        m.d.comb += acc.result.ready.eq(~res_valid)
        with m.If(acc.result.valid & acc.result.ready):
            m.d.sync += [res.eq(acc.result.payload), res_valid.eq(1)]
        k = Signal(range(fmt.result_bytes))
        n_bytes = Mux(is_result, fmt.result_bytes, Mux(is_loaded, 1, 2))
        out = Signal(8)
        with m.Switch(k):
            with m.Case(0):
                m.d.comb += out.eq(Mux(is_result, REPLY_RESULT, Mux(is_loaded, REPLY_LOADED, REPLY_ERROR)))
            with m.Case(1):
                m.d.comb += out.eq(Mux(is_result, res.cls, head_byte))
            w, b = fmt.logit_width, fmt.logit_bytes
            for c in range(fmt.classes):
                logit = Value.cast(res.logits[c])
                for j in range(b):
                    with m.Case(2 + c * b + j):      # little-endian, sign-extended
                        m.d.comb += out.eq(Cat(logit[min(8 * j + i, w - 1)] for i in range(8)))
        m.d.comb += [tx.i.payload.eq(out),
                     tx.i.valid.eq(order.r_rdy & (~needs_result | res_valid) & (~is_loaded | weights_in))]
        with m.If(tx.i.valid & tx.i.ready):
            with m.If(k == n_bytes - 1):
                m.d.sync += k.eq(0)
                m.d.comb += order.r_en.eq(1)
                with m.If(needs_result):
                    m.d.sync += res_valid.eq(0)
                with m.If(is_result):
                    m.d.sync += self.frames.eq(self.frames + 1)
            with m.Else():
                m.d.sync += k.eq(k + 1)

        # ---- status
        m.d.comb += [self.busy.eq(receiving | order.r_rdy), self.loaded.eq(weights_ok & weights_in)]
        bad = Signal(2)       # registered: the count follows a cycle later, off the parser's paths
        m.d.sync += bad.eq((rx.framing_error | rx.overrun)
                           + (order.w_en & ((entry_kind == _ERROR) | (entry_kind == _DROP))))
        m.d.sync += self.errors.eq(Mux(self.errors + bad > 255, 255, self.errors + bad))
        return m


# --------------------------------------------------------------------------- boards

def _platforms():
    from amaranth_boards.icebreaker import ICEBreakerPlatform
    from amaranth_boards.orangecrab_r0_2 import OrangeCrabR0_2_25FPlatform
    from amaranth_boards.ulx3s import ULX3S_85F_Platform
    return {"icebreaker": ICEBreakerPlatform, "ulx3s-85f": ULX3S_85F_Platform,
            "orangecrab-25f": OrangeCrabR0_2_25FPlatform}


BOARDS = ("icebreaker", "ulx3s-85f", "orangecrab-25f")


def board_platform(name):
    """A fresh amaranth-boards platform for a board name (``icebreaker``, ``ulx3s-85f``,
    ``orangecrab-25f``), with a ``uart`` resource (added on boards that lack one)."""
    platforms = _platforms()
    if name not in platforms:
        raise QnnfabError(f"unknown board {name!r} (known: {', '.join(BOARDS)})", where="board")
    platform = platforms[name]()
    ensure_uart(platform)
    return platform


def _has(platform, name, number=0):
    try:
        platform.lookup(name, number)
        return True
    except ResourceError:
        return False


def ensure_uart(platform):
    """Make sure ``platform`` has ``uart`` 0. The OrangeCrab r0.2 has none in amaranth-boards
    (its USB is the FPGA's own); it gets one on its Feather header: ``rx`` on pin "0"
    (FPGA ball N17) and ``tx`` on pin "1" (M18), LVCMOS33 with pull-up on rx, for a 3.3 V
    USB-serial adapter. Other platforms without one are an error."""
    if _has(platform, "uart"):
        return
    from amaranth_boards import orangecrab_r0_2 as oc
    if isinstance(platform, (oc.OrangeCrabR0_2Platform, oc.OrangeCrabR0_2_25FPlatform, oc.OrangeCrabR0_2_85FPlatform)):
        from amaranth.build import Attrs
        from amaranth_boards.resources import UARTResource
        platform.add_resources([UARTResource(0, rx="0", tx="1", conn=("io", 0),
                                             attrs=Attrs(IO_TYPE="LVCMOS33", PULLMODE="UP"))])
        return
    raise QnnfabError(f"platform {type(platform).__name__} has no 'uart' resource", where="board")


def _status_leds(platform):
    """Ports of the (frame toggle, error, busy) LEDs, as far as the board has them."""
    def port(name, number=0):
        return platform.request(name, number, dir="-")

    if _has(platform, "rgb_led"):                                    # OrangeCrab
        rgb = platform.request("rgb_led", 0, dir="-")
        return [rgb.g, rgb.r, rgb.b]
    if _has(platform, "led_g") and _has(platform, "led_r"):         # iCEBreaker: green, red
        return [port("led_g"), port("led_r")]
    return [port("led", i) for i in range(3) if _has(platform, "led", i)]   # ULX3S: LEDs 0-2


class BoardTop(Elaboratable):
    """:class:`UartAccelerator` on a board: its ``uart`` 0 resource at ``baud`` from the
    default clock, and status LEDs (a frame toggles the first, a line or protocol error
    lights the second, the third shows ``busy``). ``self.core`` is the
    :class:`UartAccelerator` once elaborated (the divisor depends on the platform's clock)."""

    def __init__(self, qmd, folding, baud=115200, *, timeout_bits=DEFAULT_TIMEOUT_BITS):
        if isinstance(baud, bool) or not isinstance(baud, (int, float)) or not baud > 0:
            raise QnnfabError(f"baud must be a positive number, not {baud!r}", where="baud")
        self.qmd, self.folding, self.baud, self.timeout_bits = qmd, folding, baud, timeout_bits
        self.core = None

    def elaborate(self, platform):
        if platform is None:
            raise QnnfabError("BoardTop needs a board platform (see boards.top.board_platform); simulate "
                              "UartAccelerator instead", where="platform")
        ensure_uart(platform)
        divisor = uart_divisor(platform.default_clk_frequency, self.baud)
        m = Module()
        core = self.core = m.submodules.core = UartAccelerator(self.qmd, self.folding, divisor,
                                                               timeout_bits=self.timeout_bits)
        uart = platform.request("uart", 0, dir="-")
        m.submodules.rx_buf = rx_buf = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [core.rx.eq(rx_buf.i), tx_buf.o.eq(core.tx)]

        status = [core.frames[0], core.errors != 0, core.busy]     # errors saturate: the light stays on
        for k, (led, value) in enumerate(zip(_status_leds(platform), status)):
            buf = m.submodules[f"led_buf_{k}"] = io.Buffer("o", led)
            m.d.comb += buf.o.eq(value)
        return m
