"""Training metrics: a JSONL file, TensorBoard event files (written directly: no tensorflow or
tensorboardX dependency), and a tqdm progress bar.

The event file is what TensorBoard's reader expects: TFRecord framing (uint64 length, masked CRC32C
of the length, payload, masked CRC32C of the payload) around `tensorflow.Event` protos, each carrying
a `Summary` of scalar `simple_value`s. Only the handful of proto fields needed are encoded by hand.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping

# ---------------------------------------------------------------------------------------- crc32c
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # Castagnoli polynomial, reflected
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, its masked CRC."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


# ------------------------------------------------------------------------------------ proto bits
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def event_proto(*, wall_time: float, step: int = 0, scalars: Mapping[str, float] | None = None,
                file_version: str | None = None) -> bytes:
    """A serialized tensorflow.Event: wall_time (1, double), step (2, int64), file_version (3) or
    summary (5) = Summary{value (1) = Value{tag (1), simple_value (2, float)}}."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _field_bytes(5, summary)
    return out


class EventWriter:
    """Appends scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>` (TensorBoard reads it)."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._f = open(self.path, "ab")
        self._f.write(tfrecord(event_proto(wall_time=time.time(), file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._f.write(tfrecord(event_proto(wall_time=time.time(), step=step, scalars=values)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_tfrecords(path: str | os.PathLike) -> list[bytes]:
    """Payloads of a TFRecord file, CRCs checked (tests and tools)."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(data[pos:pos + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + n]
        if struct.unpack_from("<I", data, pos + 12 + n)[0] != _masked_crc(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {pos}")
        out.append(payload)
        pos += 16 + n
    return out


# ------------------------------------------------------------------------------------------ JSONL
class JsonlLog:
    """One JSON object per logged step in `<out>/metrics.jsonl`.

    On resume, `truncate_after(step)` drops lines written after the checkpoint being resumed from,
    so the file holds each step once and a resumed run's log equals a straight run's.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: Mapping) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record), sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
