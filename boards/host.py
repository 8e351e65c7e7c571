"""Host side of the board protocol: send real test images to a board over its UART and
compare every returned class and logit with the integer reference.

    python -m boards.host --port /dev/ttyUSB1 --model bnn_mnist --board icebreaker [--images 100] [--baud 115200]

The board must run the bitstream of the same model and folding (``BoardTop``): ``--folding``,
or with ``--board`` the model's ``folding-<device>.json`` when it exists (as ``qnnfab
synth`` picks it), else ``folding.json``. A design with run-time loaded weights gets them
first (``'W'`` + the weight image, answered ``'K'``). Prints hardware and reference
accuracy, every mismatching image and frames/s; exits 0 when every integer agrees, 1 on
any mismatch or error reply, 2 on bad input (one line ``error: ...``).
Needs pyserial (``pyserial==3.5`` in requirements.txt).
"""

import argparse
import sys
import time

import numpy as np

from boards.protocol import BoardFormat, ProtocolError
from qnnfab.errors import QnnfabError, ToolMissingError

SETTLE_S = 0.3     # longer than the board's abandoned-image timeout (2^14 bit times: 0.14 s at 115200)


def open_port(port, baud, timeout):
    """A pyserial port (8N1, no flow control), or a one-line error."""
    try:
        import serial
    except ImportError:
        raise ToolMissingError("pyserial", "pip install pyserial==3.5 (it is in requirements.txt)") from None
    try:
        return serial.Serial(port, baudrate=baud, bytesize=8, parity="N", stopbits=1, timeout=timeout)
    except (serial.SerialException, ValueError) as e:
        raise QnnfabError(f"cannot open the serial port: {e}", where=port) from None


def load_weights(port, fmt, image, seconds):
    """Send ``'W'`` and the weight image; wait up to ``seconds`` for the ``'K'``. The board must
    have no reply outstanding (send it first in a session)."""
    port.write(fmt.encode_weights(image))
    where = getattr(port, "port", None) or "port"
    old = getattr(port, "timeout", None)
    if old is not None:
        port.timeout = seconds
    try:
        reply = fmt.read_reply(port.read)
    except ProtocolError as e:
        raise QnnfabError(f"weights: {e.message} (is the board running this model's bitstream at this baud?)",
                          where=where) from None
    finally:
        if old is not None:
            port.timeout = old
    if reply.kind != "K":
        what = f"'E' {chr(reply.command)!r}" if reply.kind == "E" else "a result"
        raise QnnfabError(f"the board answered {what} to the weight load instead of 'K'", where=where)


def run_session(port, fmt, images, expect_cls, expect_logits, *, window=2, log=print):
    """Send ``images`` through ``port`` (``write(bytes)``, ``read(n) -> bytes``), keeping up to
    ``window`` images in flight; compare each reply with the expected class and logits.
    Returns a summary dict; mismatching images are logged as they come."""
    n = len(images)
    frames = [fmt.encode_image(x) for x in images]
    hw_cls = np.full(n, -1)
    bad_images, bad_ints, error_replies = [], 0, 0
    sent = 0
    t0 = time.perf_counter()
    for i in range(n):
        while sent < n and sent < i + window:
            port.write(frames[sent])
            sent += 1
        try:
            reply = fmt.read_reply(port.read)
        except ProtocolError as e:
            raise QnnfabError(f"image {i}: {e.message} (is the board running this model's bitstream at this baud?)",
                              where=getattr(port, "port", None) or "port") from None
        if reply.kind == "E":
            error_replies += 1
            bad_images.append(i)
            log(f"image {i}: the board answered 'E' {chr(reply.command)!r}")
            continue
        hw_cls[i] = reply.cls
        want = [int(v) for v in expect_logits[i]]
        wrong = [c for c in range(fmt.classes) if reply.logits[c] != want[c]]
        bad = len(wrong) + int(reply.cls != int(expect_cls[i]))
        if bad:
            bad_ints += bad
            bad_images.append(i)
            log(f"image {i}: class {reply.cls} (reference {int(expect_cls[i])}); logits differ at {wrong}: "
                f"board {[reply.logits[c] for c in wrong]}, reference {[want[c] for c in wrong]}")
    seconds = time.perf_counter() - t0
    return {"images": n, "mismatching_images": bad_images, "mismatches": bad_ints, "error_replies": error_replies,
            "hardware_classes": hw_cls, "seconds": seconds, "frames_per_second": n / seconds if seconds else None}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m boards.host", description=__doc__.split("\n")[0])
    parser.add_argument("--port", required=True, help="serial device, e.g. /dev/ttyUSB1")
    parser.add_argument("--model", required=True, help="zoo name or QMD directory (the bitstream's model)")
    parser.add_argument("--folding", help="folding JSON (default: <model dir>/folding-<device>.json for --board "
                                          "when it exists, else <model dir>/folding.json)")
    parser.add_argument("--board", help="the bitstream's board (icebreaker, ...): picks the model's folding for "
                                        "its device")
    parser.add_argument("--images", type=int, default=100, help="test images to send (default 100)")
    parser.add_argument("--offset", type=int, default=0, help="index of the first test image (default 0)")
    parser.add_argument("--baud", type=int, default=115200, help="baud rate of the bitstream (default 115200)")
    parser.add_argument("--window", type=int, default=2, help="images in flight (default 2: pipelined)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for a reply byte")
    args = parser.parse_args(argv)
    try:
        from qnnfab.cli import _dataset, _load
        for name in ("images", "window", "baud"):
            if getattr(args, name) < 1:
                raise QnnfabError(f"must be at least 1, got {getattr(args, name)}", where=f"--{name}")
        device = None
        if args.board is not None:
            from boards.targets import get_target
            device = get_target(args.board).device.name
        qmd, folding = _load(args.model, args.folding, device=device)
        fmt = BoardFormat.from_model(qmd, folding)
        images, labels = _dataset(qmd)
        if not 0 <= args.offset < len(images):
            raise QnnfabError(f"must be in [0, {len(images)}), got {args.offset}", where="--offset")
        images = images[args.offset:args.offset + args.images]
        labels = labels[args.offset:args.offset + len(images)]
        from models.reference import ReferenceModel
        trace = ReferenceModel(qmd).trace(images)
        exp_logits, exp_cls = trace[qmd.layers[-2].name].numpy(), trace[qmd.layers[-1].name].numpy()

        frame_s = 10 * (1 + fmt.frame_bytes) / args.baud
        port = open_port(args.port, args.baud, args.timeout or 1.0 + 4 * frame_s * args.window)
        try:
            time.sleep(SETTLE_S)               # let an image abandoned by a previous run time out
            if hasattr(port, "reset_input_buffer"):
                port.reset_input_buffer()
            if fmt.weight_bytes:
                from hw.network import weight_image
                t0 = time.perf_counter()
                load_weights(port, fmt, weight_image(qmd, folding), 2.0 + 10 * (1 + fmt.weight_bytes) / args.baud)
                print(f"loaded {fmt.weight_bytes:,} weight bytes ('W' -> 'K') in {time.perf_counter() - t0:.2f} s")
            rep = run_session(port, fmt, images, exp_cls, exp_logits, window=args.window)
        finally:
            port.close()
    except QnnfabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = rep["images"]
    hw_acc = float((rep["hardware_classes"] == labels).mean())
    ref_acc = float((exp_cls == labels).mean())
    ok = not rep["mismatching_images"]
    print(f"{qmd.name}: {n} test images over {args.port} at {args.baud} baud: hardware accuracy "
          f"{100 * hw_acc:.2f}%, reference {100 * ref_acc:.2f}%; {rep['mismatches']} mismatching integers, "
          f"{rep['error_replies']} error replies in {len(rep['mismatching_images'])} images "
          f"({'bit-exact' if ok else 'MISMATCH'})")
    print(f"{rep['frames_per_second']:.2f} frames/s ({rep['seconds']:.2f} s; the UART allows "
          f"{1 / frame_s:.2f} frames/s at {args.baud} baud)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
