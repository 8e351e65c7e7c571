"""The board's UART protocol in one place: command and reply bytes, image encoding, reply
decoding. The host script (:mod:`boards.host`) and the board-level simulation
(:mod:`sim.board`) both use this module, so the simulation exercises the host's code.
docs/board-protocol.md is its description.

Host -> board: ``'I'`` then the frame's ``H*W*C`` input values, one byte each, in
channels-last row-major order (uint8, or int8 as two's complement); ``'W'`` then exactly
``weight_bytes`` bytes, the run-time weight image (:func:`hw.network.weight_image`), for
a design with ``"ram"`` weights. Board -> host, one reply per command in command order:
``'R', class, logits`` where each logit is ``logit_bytes`` little-endian two's
complement bytes; ``'K'`` when a weight load is complete; or ``'E', command byte`` for an
unknown command (``'W'`` included on a design without run-time weights), for an image
whose bytes stopped arriving or that came before the weights (no result), or for a weight
load whose bytes stopped arriving.
"""

import math
from dataclasses import dataclass

import numpy as np

from qnnfab.errors import QnnfabError

CMD_IMAGE = ord("I")
CMD_WEIGHTS = ord("W")       # run-time weight load (e.g. into iCE40 SPRAM); 'E' 'W' on a design without
REPLY_RESULT = ord("R")
REPLY_ERROR = ord("E")
REPLY_LOADED = ord("K")      # the weights of a 'W' are all in place
ERROR_REPLY_BYTES = 2


class ProtocolError(QnnfabError):
    """A reply that does not follow the protocol."""


@dataclass(frozen=True)
class Reply:
    """One decoded reply: ``kind`` is ``'R'`` (``cls``, ``logits`` set), ``'K'`` (weights
    loaded) or ``'E'`` (``command``: the byte the board refused)."""

    kind: str
    cls: int = None
    logits: tuple = None
    command: int = None


@dataclass(frozen=True)
class BoardFormat:
    """Byte sizes and encodings for one accelerator."""

    input_shape: tuple       # (H, W, C)
    signed: bool             # int8 inputs (two's complement bytes) instead of uint8
    classes: int
    logit_width: int         # bits of the hardware's signed logits
    weight_bytes: int = 0    # bytes after 'W' (the run-time weight image); 0: nothing to load

    @classmethod
    def from_stages(cls, qmd, stages):
        """From a QMD and its planned stages (:func:`hw.network.plan_network`)."""
        from hw.network import weight_image_bytes
        last = stages[-1]
        return cls(tuple(int(d) for d in qmd.input_shape), qmd.input_act.lo < 0,
                   int(last.params["classes"]), int(last.params["logit_shape"].width),
                   weight_image_bytes(stages))

    @classmethod
    def from_model(cls, qmd, folding):
        from hw.network import plan_network
        return cls.from_stages(qmd, plan_network(qmd, folding))

    @property
    def frame_bytes(self):
        """Pixel bytes after an ``'I'``."""
        return math.prod(self.input_shape)

    @property
    def logit_bytes(self):
        return (self.logit_width + 7) // 8

    @property
    def result_bytes(self):
        """Length of an ``'R'`` reply, the ``'R'`` included."""
        return 2 + self.classes * self.logit_bytes

    @property
    def value_range(self):
        return (-128, 127) if self.signed else (0, 255)

    def encode_image(self, image):
        """``'I'`` and the image's bytes; ``image`` is an integer array of ``input_shape``."""
        x = np.asarray(image)
        if tuple(x.shape) != self.input_shape:
            raise QnnfabError(f"image shape {tuple(x.shape)} is not the model's input shape {self.input_shape}",
                              where="image")
        if x.dtype.kind not in "iu":
            raise QnnfabError(f"image dtype {x.dtype} is not an integer type", where="image")
        lo, hi = self.value_range
        if x.size and (int(x.min()) < lo or int(x.max()) > hi):
            raise QnnfabError(f"image values outside [{lo}, {hi}] ({'int8' if self.signed else 'uint8'} input)",
                              where="image")
        return bytes([CMD_IMAGE]) + (x.astype(np.int64) & 0xFF).astype(np.uint8).tobytes()

    def encode_weights(self, image):
        """``'W'`` and the weight image (``weight_bytes`` bytes, :func:`hw.network.weight_image`)."""
        image = bytes(image)
        if not self.weight_bytes:
            raise QnnfabError("this design has no run-time loaded weights (no \"ram\" layer in its folding)",
                              where="weights")
        if len(image) != self.weight_bytes:
            raise QnnfabError(f"weight image of {len(image)} bytes, the design loads {self.weight_bytes}",
                              where="weights")
        return bytes([CMD_WEIGHTS]) + image

    def encode_result(self, cls, logits):
        """The ``'R'`` reply the board sends for ``cls`` and ``logits`` (for fakes and tests)."""
        b = self.logit_bytes
        return bytes([REPLY_RESULT, int(cls)]) + b"".join(int(v).to_bytes(b, "little", signed=True) for v in logits)

    def decode_result(self, reply):
        """An ``'R'`` reply (``result_bytes`` long) -> ``(cls, logits)``."""
        reply = bytes(reply)
        if len(reply) != self.result_bytes or reply[0] != REPLY_RESULT:
            raise ProtocolError(f"expected an 'R' reply of {self.result_bytes} bytes, got {reply[:8].hex()}"
                                f"{'...' if len(reply) > 8 else ''} ({len(reply)} bytes)", where="reply")
        cls = reply[1]
        if cls >= self.classes:
            raise ProtocolError(f"class byte {cls} is not below {self.classes} classes", where="reply")
        b = self.logit_bytes
        logits = tuple(int.from_bytes(reply[2 + c * b:2 + (c + 1) * b], "little", signed=True)
                       for c in range(self.classes))
        return cls, logits

    def read_reply(self, read):
        """Read one reply with ``read(n) -> bytes`` (fewer bytes than asked = timeout)."""
        head = read(1)
        if len(head) != 1:
            raise ProtocolError("no reply (timeout)", where="reply")
        if head[0] == REPLY_ERROR:
            rest = read(ERROR_REPLY_BYTES - 1)
            if len(rest) != ERROR_REPLY_BYTES - 1:
                raise ProtocolError("truncated 'E' reply (timeout)", where="reply")
            return Reply("E", command=rest[0])
        if head[0] == REPLY_LOADED:
            return Reply("K")
        if head[0] != REPLY_RESULT:
            raise ProtocolError(f"reply starts with byte 0x{head[0]:02x}, not 'R', 'K' or 'E'", where="reply")
        rest = read(self.result_bytes - 1)
        if len(rest) != self.result_bytes - 1:
            raise ProtocolError(f"truncated 'R' reply: {1 + len(rest)} of {self.result_bytes} bytes (timeout)",
                                where="reply")
        cls, logits = self.decode_result(head + rest)
        return Reply("R", cls=cls, logits=logits)

    def decode_replies(self, data):
        """Every reply in the byte string ``data`` (which must end on a reply boundary)."""
        data, pos, out = bytes(data), 0, []

        def read(n):
            nonlocal pos
            chunk = data[pos:pos + n]
            pos += len(chunk)
            return chunk

        while pos < len(data):
            out.append(self.read_reply(read))
        return out
