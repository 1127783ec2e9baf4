"""`jaxdiff train` flags and user errors, and the metrics writers (no compiles here; the full CLI run with
SIGKILL recovery is tests/test_training_resume.py)."""
import argparse
import struct

import pytest

from jaxdiff.training import metrics
from jaxdiff.training.cli import main, register


def _parse(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_flags():
    a = _parse("--model", "m", "--data", "d", "--out", "o", "--steps", "10", "--batch", "4", "--lr", "3e-5",
               "--resolution", "256", "--ema-decay", "0.999", "--mixed-precision", "bf16", "--remat", "dots",
               "--validation-prompt", "a cat", "--validation-prompt", "a dog", "--resume")
    assert (a.steps, a.batch, a.lr, a.resolution, a.ema_decay) == (10, 4, 3e-5, 256, 0.999)
    assert a.validation_prompt == ["a cat", "a dog"] and a.resume and a.remat == "dots"
    with pytest.raises(SystemExit):
        _parse("--model", "m", "--data", "d", "--out", "o")  # --steps is required


def test_user_error_is_one_line(tmp_path, capsys):
    rc = main(["train", "--model", str(tmp_path / "missing"), "--data", "synthetic", "--out", str(tmp_path / "o"),
               "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("jaxdiff: error:") and err.count("\n") == 1 and "missing" in err


def test_crc32c_and_event_file(tmp_path):
    assert metrics.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = metrics.EventWriter(tmp_path)
    w.scalars(7, {"loss": 0.25})
    w.close()
    records = metrics.read_tfrecords(w.path)
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    body = records[1]
    assert b"loss" in body and struct.pack("<f", 0.25) in body and body[9:11] == bytes([0x10, 7])


def test_jsonl_truncate_after(tmp_path):
    log = metrics.JsonlLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.write({"step": s, "loss": s / 10})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
