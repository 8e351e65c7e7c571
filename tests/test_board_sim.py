"""The board's UART core for bnn_mnist as Verilog in Verilator (cocotb): real MNIST test
images bit-banged into ``rx`` with the host's encoding, replies decoded from ``tx`` with
the host's decoder, every class and logit equal to the integer reference; two images
pipelined back to back, an unknown command, an abandoned image. And the iCEBreaker
folding (fc0-fc2 weights in SPRAM, elaborated for the iCE40UP5K with SB_SPRAM256KA
primitives and Yosys' simulation model of them): an image before the weights, 'W' + the
weight image, then pipelined real images."""

from boards.protocol import BoardFormat, Reply
from boards.targets import get_device
from hw.folding import load_folding
from hw.network import weight_image
from models.data import load_dataset
from models.qmd import load_qmd
from models.reference import ReferenceModel
from qnnfab.paths import ZOO_DIR
from sim.board import simulate_board


def test_bnn_mnist_over_uart_is_bit_exact(tmp_path):
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    folding = load_folding(ZOO_DIR / "bnn_mnist" / "folding.json", qmd)
    images, _ = load_dataset("mnist", "test")
    images = images[:4]
    fmt = BoardFormat.from_model(qmd, folding)
    enc = [fmt.encode_image(x) for x in images]
    script = [enc[0] + enc[1],            # pipelined: the second image follows the first at once
              b"X",                       # unknown command: 'E' 'X', after the two results
              enc[2][:300], 100,          # the host stops mid-image for 100 bit times (> 64): 'E' 'I'
              enc[3]]
    reply_bytes = 3 * fmt.result_bytes + 2 * 2
    replies, cap = simulate_board(qmd, folding, script, reply_bytes, tmp_path, divisor=4, timeout_bits=64)

    trace = ReferenceModel(qmd).trace(images)
    logits, cls = trace[qmd.layers[-2].name].numpy(), trace[qmd.layers[-1].name].numpy()
    expect = [Reply("R", cls=int(cls[i]), logits=tuple(int(v) for v in logits[i])) for i in range(4)]
    assert replies == [expect[0], expect[1], Reply("E", command=ord("X")), Reply("E", command=ord("I")), expect[3]]
    assert fmt.logit_bytes == 2 and len(set(cls[[0, 1, 3]])) == 3       # three different classes
    assert cap["reply_ns"][0] < cap["sent_ns"][0][1], "the first answer did not overlap the second image"
    assert cap["status"] == {"frames": 3, "errors": 2, "busy": 0, "loaded": 1}


def test_bnn_mnist_up5k_spram_weights_over_uart_is_bit_exact(tmp_path):
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    folding = load_folding(ZOO_DIR / "bnn_mnist" / "folding-up5k.json", qmd)
    images, _ = load_dataset("mnist", "test")
    images = images[4:7]
    fmt = BoardFormat.from_model(qmd, folding)
    image = weight_image(qmd, folding)
    assert fmt.weight_bytes == len(image) == 41472
    enc = [fmt.encode_image(x) for x in images]
    script = [enc[0],                          # before the weights: read, not computed, 'E' 'I'
              fmt.encode_weights(image),       # 'K'
              enc[1] + enc[2]]                 # pipelined, computed from the SPRAMs
    reply_bytes = 2 + 1 + 2 * fmt.result_bytes
    replies, cap = simulate_board(qmd, folding, script, reply_bytes, tmp_path, divisor=4, timeout_bits=64,
                                  platform=get_device("up5k").bare_platform())
    assert cap["primitive_models"] == ["SB_SPRAM256KA"]
    assert (tmp_path / "uart_accelerator.v").read_text().count("SB_SPRAM256KA ") == 4    # 2 + 1 + 1 blocks

    trace = ReferenceModel(qmd).trace(images)
    logits, cls = trace[qmd.layers[-2].name].numpy(), trace[qmd.layers[-1].name].numpy()
    expect = [Reply("R", cls=int(cls[i]), logits=tuple(int(v) for v in logits[i])) for i in (1, 2)]
    assert replies == [Reply("E", command=ord("I")), Reply("K"), *expect]
    assert cls[1] != cls[2]
    assert cap["status"] == {"frames": 2, "errors": 1, "busy": 0, "loaded": 1}
