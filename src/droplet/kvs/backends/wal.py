"""The durable store's file formats: log records and snapshots. Pure code, no I/O.

Both files are sequences of *records*, each framed as::

    length: u32 big-endian   (of the payload)
    crc:    u32 big-endian   (CRC-32 of the payload)
    payload: op: u8, key length: u32, key (UTF-8), data

A log segment starts with the 8-byte magic ``DRPLOG01`` and holds PUT records
(``data`` is the lattice the client sent, merged again on replay: lattice
merges are idempotent and commutative, so replaying a record twice or onto a
snapshot that already holds it changes nothing) and DELETE records.

A snapshot starts with ``DRPSNP01``, then a HEADER record (the number of the
first log segment to replay on top of it), one PUT record per key (its merged
value), and an END record with the number of PUT records: a snapshot without
its END, or with anything after it, is damaged.

Decoding never trusts a length: a record claiming more than ``MAX_RECORD`` bytes
is damage, not an allocation. A log whose tail does not decode is cut at the
last good record and the damage described (:class:`LogDamage`); a snapshot that
does not decode is refused whole (:class:`SnapshotError`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Final

import attrs

from ...errors import StorageError

__all__ = [
    "DELETE",
    "LOG_MAGIC",
    "MAX_RECORD",
    "PUT",
    "SNAPSHOT_MAGIC",
    "LogDamage",
    "LogReplay",
    "Record",
    "SnapshotError",
    "decode_log",
    "decode_snapshot",
    "encode_record",
    "encode_snapshot",
]

LOG_MAGIC: Final = b"DRPLOG01"
SNAPSHOT_MAGIC: Final = b"DRPSNP01"
PUT: Final = 1
DELETE: Final = 2
_HEADER: Final = 3
_END: Final = 4
_OPS: Final = frozenset({PUT, DELETE, _HEADER, _END})
#: the largest record accepted on decode (a frame is at most 64 MiB by default)
MAX_RECORD: Final = 1 << 31

_FRAME = struct.Struct(">II")
_KEYLEN = struct.Struct(">BI")
_U64 = struct.Struct(">Q")


class SnapshotError(StorageError):
    """A snapshot file does not decode: it is refused whole, never half-loaded."""


@attrs.frozen
class Record:
    op: int
    key: str
    data: bytes = b""


def encode_record(op: int, key: str, data: bytes = b"") -> bytes:
    """One framed record: length, CRC-32, payload."""
    encoded_key = key.encode("utf-8")
    payload = b"".join((_KEYLEN.pack(op, len(encoded_key)), encoded_key, data))
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@attrs.frozen
class LogDamage:
    """What a log's damaged tail cost: where the good records end and what was cut."""

    #: byte offset of the first byte that did not decode (the file is cut here)
    offset: int
    #: bytes from ``offset`` to the end of the file
    dropped_bytes: int
    #: why decoding stopped there
    reason: str
    #: well-formed records found after the damaged one (also dropped): more than
    #: zero means damage in the middle of the log, not a write torn by a crash
    records_after: int

    def describe(self) -> str:
        text = (f"dropped {self.dropped_bytes} bytes from offset {self.offset} "
                f"({self.reason})")
        if self.records_after:
            text += (f", including {self.records_after} well-formed record(s) after the "
                     "damage: this is not a torn write but corruption in the middle")
        return text


@attrs.frozen
class LogReplay:
    records: list[Record]
    #: None when every byte decoded
    damage: LogDamage | None
    #: bytes of the good prefix (header included): where appending may resume
    good_bytes: int


def _decode_payload(payload: memoryview) -> Record:
    op, key_len = _KEYLEN.unpack_from(payload)
    if op not in _OPS:
        raise ValueError(f"unknown record type {op}")
    end = _KEYLEN.size + key_len
    if end > len(payload):
        raise ValueError(f"key length {key_len} runs past the record")
    key = bytes(payload[_KEYLEN.size:end]).decode("utf-8")
    return Record(op, key, bytes(payload[end:]))


def _next_record(buf: memoryview, offset: int) -> tuple[Record, int]:
    """The record at ``offset`` and the offset after it; ValueError names what is wrong."""
    remaining = len(buf) - offset
    if remaining < _FRAME.size:
        raise ValueError(f"torn record header: {remaining} of {_FRAME.size} bytes")
    length, crc = _FRAME.unpack_from(buf, offset)
    if length > MAX_RECORD or length < _KEYLEN.size:
        raise ValueError(f"impossible record length {length}")
    start = offset + _FRAME.size
    if start + length > len(buf):
        raise ValueError(f"torn record: {len(buf) - start} of {length} payload bytes")
    payload = buf[start:start + length]
    if zlib.crc32(payload) != crc:
        raise ValueError("checksum mismatch")
    try:
        record = _decode_payload(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"checksummed record that does not decode: {exc}") from None
    return record, start + length


def _count_after(buf: memoryview, offset: int) -> int:
    """Well-formed records after a damaged one at ``offset`` (0 if its length is unusable)."""
    if len(buf) - offset < _FRAME.size:
        return 0
    length = _FRAME.unpack_from(buf, offset)[0]
    position = offset + _FRAME.size + length
    if length > MAX_RECORD or position > len(buf):
        return 0
    count = 0
    while position < len(buf):
        try:
            _, position = _next_record(buf, position)
        except ValueError:
            break
        count += 1
    return count


def decode_log(data: bytes) -> LogReplay:
    """The records of a log segment, stopping at the first that does not decode.

    An empty file, or one cut inside its magic, is an empty log (a segment
    being created when the node died) and reported as damage only if it holds
    anything but a prefix of the magic.
    """
    buf = memoryview(data)
    if len(data) < len(LOG_MAGIC):
        if LOG_MAGIC.startswith(data):
            damage = None if not data else LogDamage(0, len(data), "torn segment header", 0)
            return LogReplay([], damage, 0)
        return LogReplay([], LogDamage(0, len(data), "not a Droplet log", 0), 0)
    if data[:len(LOG_MAGIC)] != LOG_MAGIC:
        return LogReplay([], LogDamage(0, len(data), "not a Droplet log", 0), 0)
    records: list[Record] = []
    offset = len(LOG_MAGIC)
    while offset < len(buf):
        try:
            record, end = _next_record(buf, offset)
            if record.op not in (PUT, DELETE):
                raise ValueError(f"record type {record.op} does not belong in a log")
        except ValueError as exc:
            damage = LogDamage(offset, len(buf) - offset, str(exc), _count_after(buf, offset))
            return LogReplay(records, damage, offset)
        records.append(record)
        offset = end
    return LogReplay(records, None, offset)


def encode_snapshot(next_segment: int, items: Iterable[tuple[str, bytes]]) -> Iterator[bytes]:
    """The snapshot of ``items`` (key, merged lattice encoding), in chunks to write in order.

    ``next_segment``: the first log segment whose records are *not* in the
    snapshot (replay starts there).
    """
    yield SNAPSHOT_MAGIC
    yield encode_record(_HEADER, "", _U64.pack(next_segment))
    count = 0
    for key, value in items:
        yield encode_record(PUT, key, value)
        count += 1
    yield encode_record(_END, "", _U64.pack(count))


def decode_snapshot(data: bytes) -> tuple[int, list[tuple[str, bytes]]]:
    """``(next_segment, [(key, value), ...])`` of a snapshot; :class:`SnapshotError` if damaged."""
    buf = memoryview(data)
    if data[:len(SNAPSHOT_MAGIC)] != SNAPSHOT_MAGIC:
        raise SnapshotError("not a Droplet snapshot (bad magic)")
    offset = len(SNAPSHOT_MAGIC)
    try:
        header, offset = _next_record(buf, offset)
        if header.op != _HEADER or len(header.data) != _U64.size:
            raise ValueError("no snapshot header")
        next_segment = _U64.unpack(header.data)[0]
        items: list[tuple[str, bytes]] = []
        while True:
            record, offset = _next_record(buf, offset)
            if record.op == PUT:
                items.append((record.key, record.data))
                continue
            if record.op != _END or len(record.data) != _U64.size:
                raise ValueError(f"unexpected record type {record.op}")
            break
    except ValueError as exc:
        raise SnapshotError(f"damaged at offset {offset}: {exc}") from None
    (count,) = _U64.unpack(record.data)
    if count != len(items):
        raise SnapshotError(f"the end record counts {count} keys, the snapshot holds "
                            f"{len(items)}")
    if offset != len(buf):
        raise SnapshotError(f"{len(buf) - offset} unexpected bytes after the end record")
    return next_segment, items
