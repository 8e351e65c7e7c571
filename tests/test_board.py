"""The UART accelerator core (boards/top.py) in Amaranth's simulator on small random
networks: images bit-banged into ``rx``, replies decoded from ``tx`` with the host's
protocol code (boards/protocol.py) and compared with the integer reference; pipelined
images, unknown commands, 'W' on a design without run-time weights, an abandoned image;
with run-time weights: images before the weights, 'W' + image -> 'K', reload, an
abandoned load; the protocol's encoding."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from boards.protocol import BoardFormat, ProtocolError, Reply
from boards.top import UartAccelerator
from hw.network import weight_image
from models.qmd import save_qmd
from models.reference import ReferenceModel
from models.synthetic import random_binary_mlp
from qnnfab.errors import QnnfabError


def _levels(byte):
    return [0] + [(byte >> k) & 1 for k in range(8)] + [1]


def run_core(core, script, reply_bytes, max_cycles=200_000):
    """Bit-bang ``script`` (byte strings sent back to back; an int = that many idle
    cycles) into ``core.rx``; return the first ``reply_bytes`` bytes seen on ``core.tx``
    and the status outputs at the end."""
    d = core.divisor
    got, status = bytearray(), {}

    async def driver(ctx):
        ctx.set(core.rx, 1)
        await ctx.tick().repeat(4 * d)
        for item in script:
            if isinstance(item, int):
                await ctx.tick().repeat(item)
                continue
            for byte in item:
                for level in _levels(byte):
                    ctx.set(core.rx, level)
                    await ctx.tick().repeat(d)
        ctx.set(core.rx, 1)

    async def listener(ctx):         # a UART receiver model: tx changes only at clock edges
        cycles = 0
        while len(got) < reply_bytes:
            await ctx.tick()
            cycles += 1
            if cycles > max_cycles:
                raise AssertionError(f"{len(got)} of {reply_bytes} reply bytes after {cycles} cycles: {got.hex()}")
            if ctx.get(core.tx):
                continue
            await ctx.tick().repeat(d // 2)
            assert ctx.get(core.tx) == 0, "start bit too short"
            byte = 0
            for k in range(8):
                await ctx.tick().repeat(d)
                byte |= ctx.get(core.tx) << k
            await ctx.tick().repeat(d)
            assert ctx.get(core.tx) == 1, "stop bit low"
            got.append(byte)
            cycles += 9 * d + d // 2
        await ctx.tick().repeat(8 * d)
        status.update(frames=ctx.get(core.frames), errors=ctx.get(core.errors), busy=ctx.get(core.busy),
                      loaded=ctx.get(core.loaded))

    sim = Simulator(core)
    sim.add_clock(1e-8)
    sim.add_testbench(driver, background=True)
    sim.add_testbench(listener)
    sim.run()
    return bytes(got), status


def _int8_mlp(directory, sizes, seed):
    """Like models.synthetic.random_binary_mlp, with int8 inputs."""
    rng = np.random.default_rng(seed)
    n0 = sizes[0]
    layers = [{"name": "binarize", "kind": "threshold", "out": {"kind": "binary"},
               "arrays": {"thresholds": rng.integers(-129, 129, (1, 1)), "direction": rng.choice([-1, 1], 1)}}]
    for k, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append({"name": f"fc{k}", "kind": "dense", "in_features": n, "out_features": m, "weight": "binary",
                       "arrays": {"weights": rng.choice([-1, 1], (m, n))}})
        if k < len(sizes) - 2:
            layers.append({"name": f"fc{k}_act", "kind": "threshold", "out": {"kind": "binary"},
                           "arrays": {"thresholds": rng.integers(-3, 4, (m, 1)),
                                      "direction": rng.choice([-1, 1], m)}})
    layers.append({"name": "class", "kind": "argmax"})
    return save_qmd(directory, "int8_mlp", [n0 // 2, 2, 1], "int8", layers)


def _expected(qmd, images):
    trace = ReferenceModel(qmd).trace(images)
    logits = trace[qmd.layers[-2].name].numpy()
    cls = trace[qmd.layers[-1].name].numpy()
    return [Reply("R", cls=int(c), logits=tuple(int(v) for v in row)) for c, row in zip(cls, logits)]


@pytest.mark.parametrize("case", ["uint8_12_lanes", "uint8_1_lane", "int8_4_lanes"])
def test_core_pipelined_images_errors_and_timeout(tmp_path, case):
    if case.startswith("uint8"):
        qmd = random_binary_mlp(tmp_path / "qmd", [24, 12, 8, 6], seed=5)
        simd = 12 if case == "uint8_12_lanes" else 1
        folding = {"fc0": {"pe": 4, "simd": simd}, "fc1": {"pe": 2, "simd": 4}, "fc2": {"pe": 3, "simd": 8}}
        lo, hi, divisor = 0, 256, 4
    else:
        qmd = _int8_mlp(tmp_path / "qmd", [16, 8, 5], seed=6)
        folding = {"fc0": {"pe": 2, "simd": 4}, "fc1": {"pe": 5, "simd": 8}}
        lo, hi, divisor = -128, 128, 5
    core = UartAccelerator(qmd, folding, divisor, timeout_bits=40)
    fmt = core.format
    assert core.lanes == {"uint8_12_lanes": 12, "uint8_1_lane": 1, "int8_4_lanes": 4}[case]
    rng = np.random.default_rng(len(case))
    images = rng.integers(lo, hi, (5, *qmd.input_shape))
    images[0].flat[:3] = [lo, hi - 1, 0]
    enc = [fmt.encode_image(x) for x in images]
    script = [enc[0] + enc[1],          # two images back to back: the second before the first answer
              b"X", b"W",               # unknown, and reserved: 'E' replies, in command order
              enc[2],
              enc[3][:1 + fmt.frame_bytes // 2], 60 * divisor,   # the host stops mid-image: 'E' 'I'
              enc[4]]
    n = 4 * fmt.result_bytes + 3 * 2
    raw, status = run_core(core, script, n)
    replies = fmt.decode_replies(raw)
    expect = _expected(qmd, images)
    assert replies == [expect[0], expect[1], Reply("E", command=ord("X")), Reply("E", command=ord("W")),
                       expect[2], Reply("E", command=ord("I")), expect[4]]
    assert status == {"frames": 4, "errors": 3, "busy": 0, "loaded": 1}


def test_core_with_run_time_weights(tmp_path):
    """fc0 and fc2 in run-time loaded RAM: an image before any 'W' is answered 'E' 'I' (not
    computed); 'W' + the weight image -> 'K'; pipelined images bit-exact; a second 'W'
    reloads ('K') and images stay bit-exact; a 'W' whose bytes stop -> 'E' 'W', after which
    images are refused again until the next complete load."""
    qmd = random_binary_mlp(tmp_path / "qmd", [24, 12, 8, 6], seed=8)
    folding = {"fc0": {"pe": 4, "simd": 12, "weights": "ram"}, "fc1": {"pe": 2, "simd": 4},
               "fc2": {"pe": 3, "simd": 8, "weights": "ram"}}
    divisor = 4
    core = UartAccelerator(qmd, folding, divisor, timeout_bits=40)
    fmt = core.format
    image = weight_image(qmd, folding)
    assert fmt.weight_bytes == len(image) == 6 * 6 + 2 * 3      # fc0: 6 words of 48 bits, fc2: 2 of 24
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, *qmd.input_shape))
    enc = [fmt.encode_image(x) for x in images]
    gap = 60 * 10 * divisor          # idle cycles: every reply is out before the next 'W'
    script = [enc[0],                                  # before the weights: 'E' 'I'
              fmt.encode_weights(image),               # 'K'
              enc[1] + enc[2],                         # two pipelined results
              gap, fmt.encode_weights(image),          # reload: 'K'
              enc[3],
              gap, fmt.encode_weights(image)[:10], 60 * divisor,   # a stalled load: 'E' 'W'
              enc[4]]                                  # weights unloaded: 'E' 'I'
    n = 3 * fmt.result_bytes + 2 + 3 * 2
    raw, status = run_core(core, script, n, max_cycles=400_000)
    expect = _expected(qmd, images)
    assert fmt.decode_replies(raw) == [Reply("E", command=ord("I")), Reply("K"), expect[1], expect[2], Reply("K"),
                                       expect[3], Reply("E", command=ord("W")), Reply("E", command=ord("I"))]
    assert status == {"frames": 3, "errors": 3, "busy": 0, "loaded": 0}


def test_core_rejects_a_uart_faster_than_the_network_and_bad_parameters(tmp_path):
    qmd = random_binary_mlp(tmp_path / "qmd", [4, 64, 64, 2], seed=5)
    slow = {"fc0": {"pe": 1, "simd": 1}, "fc1": {"pe": 1, "simd": 1}, "fc2": {"pe": 1, "simd": 1}}
    with pytest.raises(QnnfabError, match=r"^divisor: the accelerator needs 4096 cycles per frame but the UART "
                                          r"delivers one every 200 cycles at 4 cycles per bit"):
        UartAccelerator(qmd, slow, 4)
    assert UartAccelerator(qmd, slow, 82).uart_frame_cycles == 10 * 82 * 5      # 4100 >= 4096
    with pytest.raises(ValueError, match="divisor must be an integer >= 4"):
        UartAccelerator(qmd, slow, 3)
    with pytest.raises(ValueError, match="timeout_bits must be an integer >= 20"):
        UartAccelerator(qmd, slow, 40, timeout_bits=5)
    with pytest.raises(ValueError, match="fifo_depth must be an integer >= 2"):
        UartAccelerator(qmd, slow, 40, fifo_depth=1)


def test_protocol_encoding_and_decoding():
    fmt = BoardFormat(input_shape=(2, 2, 1), signed=True, classes=3, logit_width=10)
    assert (fmt.frame_bytes, fmt.logit_bytes, fmt.result_bytes) == (4, 2, 8)
    assert fmt.encode_image(np.array([[[-128], [-1]], [[0], [127]]])) == b"I\x80\xff\x00\x7f"
    reply = b"R\x02" + (-300).to_bytes(2, "little", signed=True) + (5).to_bytes(2, "little", signed=True) \
        + (511).to_bytes(2, "little", signed=True)
    assert fmt.decode_result(reply) == (2, (-300, 5, 511))
    assert fmt.decode_replies(reply + b"EX" + reply) == [Reply("R", 2, (-300, 5, 511)), Reply("E", command=88),
                                                         Reply("R", 2, (-300, 5, 511))]
    with pytest.raises(QnnfabError, match=r"^image: image shape \(4,\) is not the model's input shape"):
        fmt.encode_image(np.zeros(4, np.int8))
    with pytest.raises(QnnfabError, match=r"^image: image values outside \[-128, 127\] \(int8 input\)"):
        fmt.encode_image(np.full((2, 2, 1), 128))
    with pytest.raises(QnnfabError, match=r"^image: image dtype float64 is not an integer type"):
        fmt.encode_image(np.zeros((2, 2, 1)))
    with pytest.raises(ProtocolError, match=r"^reply: truncated 'R' reply: 5 of 8 bytes"):
        fmt.decode_replies(reply[:5])
    with pytest.raises(ProtocolError, match=r"^reply: reply starts with byte 0x5a, not 'R', 'K' or 'E'"):
        fmt.decode_replies(b"Z")
    with pytest.raises(ProtocolError, match=r"^reply: class byte 3 is not below 3 classes"):
        fmt.decode_result(b"R\x03" + reply[2:])
    assert fmt.decode_replies(b"K" + reply + b"EW") == [Reply("K"), Reply("R", 2, (-300, 5, 511)),
                                                        Reply("E", command=ord("W"))]
    with pytest.raises(QnnfabError, match=r"^weights: this design has no run-time loaded weights"):
        fmt.encode_weights(b"")
    wfmt = BoardFormat(input_shape=(2, 2, 1), signed=False, classes=3, logit_width=4, weight_bytes=3)
    assert wfmt.encode_weights(b"\x01\x02\x03") == b"W\x01\x02\x03"
    with pytest.raises(QnnfabError, match=r"^weights: weight image of 2 bytes, the design loads 3"):
        wfmt.encode_weights(b"\x01\x02")
