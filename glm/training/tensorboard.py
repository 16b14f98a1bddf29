"""A dependency-free TensorBoard event-file writer (scalars and text).

TensorBoard reads TFRecord files of `Event` protocol buffers. Writing them
needs neither TensorFlow nor the tensorboard package: this module encodes the
few messages it needs by hand.

  TFRecord: uint64 length | uint32 masked_crc32c(length) | data |
            uint32 masked_crc32c(data)
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
            Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; TensorProto tensor = 8;
            SummaryMetadata metadata = 9; }
Text summaries are string tensors with the 'text' plugin, as tf.summary.text
writes them.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
  return _key(field, 2) + _varint(len(data)) + data


def _event(step: int, wall_time: float, *, summary: bytes | None = None,
           file_version: str | None = None) -> bytes:
  out = _key(1, 1) + struct.pack('<d', wall_time) + _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack('<f', value)


def _text_value(tag: str, text: str) -> bytes:
  dt_string = 7
  tensor = (_key(1, 0) + _varint(dt_string) + _bytes_field(2, b'')
            + _bytes_field(8, text.encode()))
  plugin = _bytes_field(1, b'text')
  metadata = _bytes_field(1, plugin)
  return (_bytes_field(1, tag.encode()) + _bytes_field(8, tensor)
          + _bytes_field(9, metadata))


class EventWriter:
  """Appends scalar and text summaries to one events file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
            f'.{os.getpid()}.glm')
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, 'ab')
    self._write(_event(0, time.time(), file_version='brain.Event:2'))

  def _write(self, data: bytes) -> None:
    header = struct.pack('<Q', len(data))
    self._f.write(header + struct.pack('<I', _masked_crc(header)) + data
                  + struct.pack('<I', _masked_crc(data)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    summary = b''.join(_bytes_field(1, _scalar_value(k, float(v)))
                       for k, v in values.items())
    self._write(_event(step, time.time(), summary=summary))

  def text(self, step: int, tag: str, text: str) -> None:
    self._write(_event(step, time.time(),
                       summary=_bytes_field(1, _text_value(tag, text))))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()
