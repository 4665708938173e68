"""Third-party chatter goes to the stage's log file; the console keeps toolkit's own words."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

from toolkit.logs import route_logs


def test_third_party_logging_and_warnings_land_in_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "run" / "train.log"
    with route_logs(log_file):
        # loggers of their own: the real libraries' loggers may be configured by earlier tests
        logging.getLogger("test_logs.gptqmodel").info("Syncing lazy checkpoint writes")
        logging.getLogger("test_logs.bitsandbytes").warning("Failed to load CPU gemm_4bit_forward")
        warnings.warn("torch.utils._pytree._register_pytree_node is deprecated", FutureWarning,
                      stacklevel=1)
        logging.getLogger("toolkit.export").warning("our own warning")
    text = log_file.read_text()
    for line in ("Syncing lazy checkpoint writes", "gemm_4bit_forward", "_pytree", "our own"):
        assert line in text
    err = capsys.readouterr().err
    assert "our own warning" in err
    assert "Syncing" not in err and "gemm_4bit" not in err and "_pytree" not in err


def test_verbose_shows_everything_on_the_console(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with route_logs(tmp_path / "x.log", verbose=True):
        logging.getLogger("onnxruntime.quantization").info("skip to quantize /lm_head/MatMul")
    assert "skip to quantize" in capsys.readouterr().err
    assert "skip to quantize" in (tmp_path / "x.log").read_text()


def test_records_before_attach_and_library_handlers(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    noisy = logging.getLogger("noisylib")
    own = logging.StreamHandler(sys.stderr)
    noisy.addHandler(own)
    noisy.propagate = False
    try:
        with route_logs() as logs:
            noisy.warning("early chatter")  # before the folder exists
            late = logging.getLogger("latelib")
            late_handler = logging.StreamHandler(sys.stderr)
            late.addHandler(late_handler)  # a library configured after the stage started
            late.propagate = False
            logs.attach(tmp_path / "export.log")
            late.warning("late chatter")
            latest = logging.getLogger("latestlib")  # imported mid-stage, like torch._logging
            latest_handler = logging.StreamHandler(sys.stderr)
            latest.addHandler(latest_handler)
            latest.propagate = False
            logging.getLogger("otherlib").info("any record reaching the file")  # sweeps again
            latest.warning("latest chatter")
        assert capsys.readouterr().err == ""
        text = (tmp_path / "export.log").read_text()
        assert "early chatter" in text and "late chatter" in text and "latest chatter" in text
        assert latest_handler in latest.handlers and latest.propagate is False
        # everything is put back afterwards
        assert own in noisy.handlers and noisy.propagate is False
        assert late_handler in late.handlers and late.propagate is False
        assert logging.getLogger().level == logging.WARNING
    finally:
        noisy.removeHandler(own)
        noisy.propagate = True


@pytest.mark.parametrize("verbose", [False, True])
def test_bytes_printed_to_the_terminal_go_to_the_file_unless_verbose(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], verbose: bool) -> None:
    from toolkit.logs import terminal_to_log

    log_file = tmp_path / "export.log"
    with route_logs(log_file, verbose=verbose), terminal_to_log():
        os.write(1, b"Quantizing layer 3 of 30\n")  # as C code or a progress bar writes
        os.write(2, b"Forward: Layer=model.layers.3\n")
    print("after the block")
    out, err = capfd.readouterr()
    text = log_file.read_text()
    assert "after the block" in out and "after the block" not in text
    if verbose:
        assert "Quantizing layer 3" in out and "Forward: Layer" in err
    else:
        assert "Quantizing layer 3" in text and "Forward: Layer" in text
        assert "Quantizing" not in out and "Forward" not in err
