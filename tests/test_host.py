"""The host script (boards/host.py) against a fake board on a fake serial port: the real
protocol bytes both ways, every logit compared, mismatches and error replies reported
with exit status 1, bad input as one line with status 2, pyserial missing named; the
run-time weight load ('W' + image -> 'K') of bnn_mnist's iCEBreaker folding."""

import sys

import numpy as np
import pytest

import boards.host as host
from boards.protocol import CMD_IMAGE, CMD_WEIGHTS, REPLY_ERROR, REPLY_LOADED, BoardFormat
from models.data import load_dataset
from models.qmd import load_qmd
from models.reference import ReferenceModel
from qnnfab.errors import ToolMissingError
from qnnfab.paths import ZOO_DIR


class FakeBoard:
    """A serial port with the protocol's board side behind it, answering with the reference;
    ``corrupt``: image index -> (class index whose logit is off by one) or 'E'."""

    def __init__(self, qmd, fmt, corrupt=None, weights=None):
        self.fmt, self.ref, self.corrupt = fmt, ReferenceModel(qmd), corrupt or {}
        self.inbox, self.outbox, self.images, self.max_in_flight = bytearray(), bytearray(), 0, 0
        self.port, self.closed = "/dev/fake", False
        self.weights, self.loaded, self.timeout = weights, weights is None, 1.0    # weights: the image it expects

    def write(self, data):
        self.inbox += data
        self.max_in_flight = max(self.max_in_flight, len(self.inbox) // (1 + self.fmt.frame_bytes))

    def read(self, n):
        while len(self.outbox) < n and self.inbox:       # the board works on what it has received
            if self.inbox[0] == CMD_WEIGHTS and self.weights is not None:
                got = bytes(self.inbox[1:1 + len(self.weights)])
                del self.inbox[:1 + len(self.weights)]
                self.loaded = got == self.weights
                self.outbox += bytes([REPLY_LOADED]) if self.loaded else bytes([REPLY_ERROR, CMD_WEIGHTS])
                continue
            if self.inbox[0] == CMD_IMAGE and not self.loaded:
                del self.inbox[:1 + self.fmt.frame_bytes]
                self.outbox += bytes([REPLY_ERROR, CMD_IMAGE])
                continue
            if self.inbox[0] != CMD_IMAGE:
                self.outbox += bytes([REPLY_ERROR, self.inbox.pop(0)])
                continue
            frame = bytes(self.inbox[1:1 + self.fmt.frame_bytes])
            del self.inbox[:1 + self.fmt.frame_bytes]
            x = np.frombuffer(frame, np.uint8).reshape(1, *self.fmt.input_shape).copy()
            trace = self.ref.trace(x)
            logits = trace[self.ref.qmd.layers[-2].name].numpy()[0].tolist()
            cls = int(trace[self.ref.qmd.layers[-1].name].numpy()[0])
            what = self.corrupt.get(self.images)
            self.images += 1
            if what == "E":
                self.outbox += bytes([REPLY_ERROR, CMD_IMAGE])
                continue
            if what is not None:
                logits[what] += 1
            self.outbox += self.fmt.encode_result(cls, logits)
        out = bytes(self.outbox[:n])
        del self.outbox[:n]
        return out

    def reset_input_buffer(self):
        self.outbox.clear()

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def mnist():
    from hw.folding import load_folding
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    return qmd, BoardFormat.from_model(qmd, load_folding(ZOO_DIR / "bnn_mnist" / "folding.json", qmd))


def _run(monkeypatch, capsys, board, *args):
    monkeypatch.setattr(host, "open_port", lambda port, baud, timeout: board)
    monkeypatch.setattr(host, "SETTLE_S", 0)
    rc = host.main(["--port", "/dev/fake", "--model", "bnn_mnist", *args])
    return rc, capsys.readouterr()


def test_host_all_images_bit_exact(monkeypatch, capsys, mnist):
    board = FakeBoard(*mnist)
    rc, out = _run(monkeypatch, capsys, board, "--images", "12", "--offset", "5")
    images, labels = load_dataset("mnist", "test")
    ref_acc = float((ReferenceModel(mnist[0]).run(images[5:17]).numpy() == labels[5:17]).mean())
    assert rc == 0, out.err
    assert board.images == 12 and board.closed and board.max_in_flight == 2     # pipelined by two
    assert (f"bnn_mnist: 12 test images over /dev/fake at 115200 baud: hardware accuracy {100 * ref_acc:.2f}%, "
            f"reference {100 * ref_acc:.2f}%; 0 mismatching integers, 0 error replies in 0 images (bit-exact)"
            in out.out)
    assert "frames/s" in out.out and "the UART allows 14.68 frames/s at 115200 baud" in out.out


def test_host_loads_run_time_weights_first(monkeypatch, capsys):
    """--board icebreaker picks bnn_mnist's folding-up5k.json (fc0-fc2 in SPRAM): the host sends
    'W' and the exact weight image first, gets 'K', then every image is bit-exact."""
    from hw.folding import load_folding
    from hw.network import weight_image
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    folding = load_folding(ZOO_DIR / "bnn_mnist" / "folding-up5k.json", qmd)
    fmt = BoardFormat.from_model(qmd, folding)
    assert fmt.weight_bytes == 6272 * 4 + 2 * 4096 * 2 == 41472
    board = FakeBoard(qmd, fmt, weights=weight_image(qmd, folding))
    rc, out = _run(monkeypatch, capsys, board, "--images", "4", "--board", "icebreaker")
    assert rc == 0, out.err
    assert board.loaded and board.images == 4 and board.timeout == 1.0      # the load's long timeout undone
    assert "loaded 41,472 weight bytes ('W' -> 'K')" in out.out and "(bit-exact)" in out.out

    board = FakeBoard(qmd, fmt, weights=bytes(fmt.weight_bytes))    # expects other bytes: answers 'E' 'W'
    rc, out = _run(monkeypatch, capsys, board, "--images", "4", "--board", "icebreaker")
    assert rc == 2 and out.err.strip() == ("error: /dev/fake: the board answered 'E' 'W' to the weight load "
                                           "instead of 'K'")


def test_host_reports_every_mismatch_and_error_reply(monkeypatch, capsys, mnist):
    board = FakeBoard(*mnist, corrupt={1: 3, 4: "E"})
    rc, out = _run(monkeypatch, capsys, board, "--images", "6", "--window", "3")
    assert rc == 1
    assert board.max_in_flight == 3
    assert "image 1: class" in out.out and "logits differ at [3]" in out.out
    assert "image 4: the board answered 'E' 'I'" in out.out
    assert "1 mismatching integers, 1 error replies in 2 images (MISMATCH)" in out.out


def test_host_errors_are_one_line(monkeypatch, capsys, mnist):
    rc, out = _run(monkeypatch, capsys, FakeBoard(*mnist), "--images", "0")
    assert rc == 2 and out.err.strip() == "error: --images: must be at least 1, got 0"
    rc, out = _run(monkeypatch, capsys, FakeBoard(*mnist), "--model", "no_such_model")
    assert rc == 2 and out.err.startswith("error: unknown model 'no_such_model'") and out.err.count("\n") == 1

    class Silent(FakeBoard):
        def read(self, n):
            return b""
    rc, out = _run(monkeypatch, capsys, Silent(*mnist), "--images", "2")
    assert rc == 2
    assert out.err.strip() == ("error: /dev/fake: image 0: no reply (timeout) (is the board running this "
                               "model's bitstream at this baud?)")


def test_missing_pyserial_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "serial", None)          # import serial -> ImportError
    with pytest.raises(ToolMissingError, match=r"required tool 'pyserial' not found; install it with: "
                                               r"pip install pyserial==3\.5"):
        host.open_port("/dev/ttyUSB1", 115200, 1.0)
