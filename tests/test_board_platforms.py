"""BoardTop elaborates for each supported board to the toolchain's input files (RTLIL and
pin constraints) without running synthesis; the UART and LED pins land where the
board's documentation says; unknown boards and unreachable bauds are one-line errors."""

import pytest

from boards.top import BOARDS, BoardTop, board_platform, ensure_uart
from hw.folding import load_folding
from models.qmd import load_qmd
from models.synthetic import random_binary_mlp
from qnnfab.errors import QnnfabError
from qnnfab.paths import ZOO_DIR

# board -> (clock Hz, divisor at 115200 baud, constraint file, rx pin, tx pin, LED pins)
EXPECT = {
    "icebreaker": (12e6, 104, "pcf", "set_io uart_0__rx__io 6", "set_io uart_0__tx__io 9",
                   ["set_io led_g_0__io 37", "set_io led_r_0__io 11"]),
    "ulx3s-85f": (25e6, 217, "lpf", 'LOCATE COMP "uart_0__rx__io" SITE "M1"', 'LOCATE COMP "uart_0__tx__io" SITE "L4"',
                  [f'LOCATE COMP "led_{k}__io" SITE "{p}"' for k, p in enumerate(["B2", "C2", "C1"])]),
    "orangecrab-25f": (48e6, 417, "lpf", 'LOCATE COMP "uart_0__rx__io" SITE "N17"',
                       'LOCATE COMP "uart_0__tx__io" SITE "M18"',
                       [f'LOCATE COMP "rgb_led_0__{c}__io" SITE "{p}"' for c, p in zip("grb", ["M3", "K4", "J3"])]),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    qmd = random_binary_mlp(tmp_path_factory.mktemp("qmd"), [24, 12, 8, 6], seed=5)
    return qmd, {"fc0": {"pe": 4, "simd": 12}, "fc1": {"pe": 2, "simd": 4}, "fc2": {"pe": 3, "simd": 8}}


@pytest.mark.parametrize("board", BOARDS)
def test_board_top_elaborates_with_uart_and_leds_on_the_right_pins(board, small):
    platform = board_platform(board)
    top = BoardTop(*small, baud=115200)
    plan = platform.prepare(top, name="qnnfab_top")
    clk, divisor, ext, rx, tx, leds = EXPECT[board]
    assert platform.default_clk_frequency == clk
    assert top.core.divisor == divisor == round(clk / 115200)
    constraints = plan.files[f"qnnfab_top.{ext}"]
    for line in [rx, tx, *leds]:
        assert line in constraints
    rtlil = plan.files["qnnfab_top.il"]
    assert "uart_rx" in rtlil and "accelerator" in rtlil


def test_bnn_mnist_board_top_elaborates_for_icebreaker():
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    folding = load_folding(ZOO_DIR / "bnn_mnist" / "folding.json", qmd)
    top = BoardTop(qmd, folding)
    plan = board_platform("icebreaker").prepare(top, name="bnn_mnist")
    assert "bnn_mnist.il" in plan.files
    assert top.core.format.frame_bytes == 784 and top.core.lanes == 49


def test_bnn_mnist_up5k_folding_puts_weights_in_spram_on_the_icebreaker():
    """The iCEBreaker folding elaborates with fc0-fc2 as SB_SPRAM256KA instances (2 + 1 + 1);
    the same core without a platform (simulation) has no primitive."""
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    folding = load_folding(ZOO_DIR / "bnn_mnist" / "folding-up5k.json", qmd)
    top = BoardTop(qmd, folding)
    rtlil = board_platform("icebreaker").prepare(top, name="bnn_mnist").files["bnn_mnist.il"]
    assert rtlil.count("cell \\SB_SPRAM256KA ") == 4
    assert top.core.format.weight_bytes == 41472 and top.core.lanes == 16
    from amaranth.back import rtlil as rtlil_backend
    from boards.top import UartAccelerator
    assert "SB_SPRAM256KA" not in rtlil_backend.convert(UartAccelerator(qmd, folding, 104), name="core")


def test_board_errors_are_one_line(small):
    with pytest.raises(QnnfabError, match=r"^board: unknown board 'icestick' \(known: icebreaker, ulx3s-85f, "
                                          r"orangecrab-25f\)$"):
        board_platform("icestick")
    with pytest.raises(QnnfabError, match=r"^baud: 4000000 baud is unreachable at 12 MHz"):
        board_platform("icebreaker").prepare(BoardTop(*small, baud=4_000_000))
    with pytest.raises(QnnfabError, match=r"^baud: baud must be a positive number, not -1"):
        BoardTop(*small, baud=-1)
    from amaranth_boards.tinyfpga_bx import TinyFPGABXPlatform
    with pytest.raises(QnnfabError, match=r"^board: platform TinyFPGABXPlatform has no 'uart' resource$"):
        ensure_uart(TinyFPGABXPlatform())
