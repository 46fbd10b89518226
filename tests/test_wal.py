"""The durable store's log and snapshot encodings (kvs/backends/wal.py): pure, no I/O."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from droplet.kvs.backends.wal import (
    DELETE,
    LOG_MAGIC,
    PUT,
    SNAPSHOT_MAGIC,
    Record,
    SnapshotError,
    decode_log,
    decode_snapshot,
    encode_record,
    encode_snapshot,
)

keys = st.text(max_size=40)
records = st.builds(Record, st.sampled_from([PUT, DELETE]), keys, st.binary(max_size=200))


def log_of(recs: list[Record]) -> bytes:
    return LOG_MAGIC + b"".join(encode_record(r.op, r.key, r.data) for r in recs)


@given(st.lists(records, max_size=30))
def test_log_round_trip(recs: list[Record]) -> None:
    data = log_of(recs)
    replay = decode_log(data)
    assert replay.records == recs
    assert replay.damage is None
    assert replay.good_bytes == len(data)


@settings(max_examples=300)
@given(st.lists(records, min_size=1, max_size=20), st.data())
def test_torn_tail_keeps_every_whole_record_and_reports_the_rest(
        recs: list[Record], data: st.DataObject) -> None:
    """A crash mid-write leaves a prefix: every whole record survives, the rest is reported."""
    full = log_of(recs)
    cut = data.draw(st.integers(len(LOG_MAGIC), len(full) - 1))
    replay = decode_log(full[:cut])
    # the records that fit entirely in the prefix, exactly
    ends = []
    position = len(LOG_MAGIC)
    for r in recs:
        position += len(encode_record(r.op, r.key, r.data))
        ends.append(position)
    whole = sum(1 for end in ends if end <= cut)
    assert replay.records == recs[:whole]
    good = ends[whole - 1] if whole else len(LOG_MAGIC)
    assert replay.good_bytes == good
    if cut == good:
        assert replay.damage is None  # cut exactly between records: nothing torn
    else:
        assert replay.damage is not None
        assert replay.damage.offset == good
        assert replay.damage.dropped_bytes == cut - good
        assert replay.damage.records_after == 0
        assert "torn" in replay.damage.reason


@settings(max_examples=300)
@given(st.lists(records, min_size=1, max_size=20), st.data())
def test_flipped_bit_is_caught_by_the_checksum(recs: list[Record], data: st.DataObject) -> None:
    full = bytearray(log_of(recs))
    bit = data.draw(st.integers(len(LOG_MAGIC) * 8, len(full) * 8 - 1))
    full[bit // 8] ^= 1 << (bit % 8)
    replay = decode_log(bytes(full))
    # the records before the flipped one survive intact; the flipped one never does
    position = len(LOG_MAGIC)
    before = 0
    for r in recs:
        size = len(encode_record(r.op, r.key, r.data))
        if position + size > bit // 8:
            break
        position += size
        before += 1
    assert replay.records == recs[:before]
    assert replay.damage is not None and replay.damage.offset == position
    assert replay.damage.dropped_bytes == len(full) - position
    # whatever followed is counted (when the damaged record's length still frames it)
    assert 0 <= replay.damage.records_after <= len(recs) - before - 1


def test_damage_in_the_middle_counts_the_records_after_it() -> None:
    recs = [Record(PUT, f"k{i}", b"v" * 10) for i in range(5)]
    data = bytearray(log_of(recs))
    second = len(LOG_MAGIC) + len(encode_record(PUT, "k0", b"v" * 10))
    data[second + 12] ^= 0xFF  # a payload byte of record 1: its length still frames it
    replay = decode_log(bytes(data))
    assert replay.records == recs[:1]
    assert replay.damage is not None
    assert replay.damage.reason == "checksum mismatch"
    assert replay.damage.records_after == 3
    text = replay.damage.describe()
    assert f"offset {second}" in text and "3 well-formed record(s)" in text


def test_impossible_length_is_damage_not_an_allocation() -> None:
    data = LOG_MAGIC + encode_record(PUT, "a", b"1") + b"\xff\xff\xff\xff\x00\x00\x00\x00"
    replay = decode_log(data)
    assert [r.key for r in replay.records] == ["a"]
    assert replay.damage is not None and "impossible record length" in replay.damage.reason


def test_checksummed_garbage_payload_is_damage() -> None:
    payload = b"\x09\x00\x00\x00\x00"  # unknown record type 9, with a valid CRC
    frame = len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big")
    replay = decode_log(LOG_MAGIC + frame + payload)
    assert replay.records == []
    assert replay.damage is not None and "unknown record type 9" in replay.damage.reason


@pytest.mark.parametrize("data", [b"", LOG_MAGIC[:3], LOG_MAGIC])
def test_empty_or_just_created_segments(data: bytes) -> None:
    replay = decode_log(data)
    assert replay.records == []
    assert replay.good_bytes == (len(data) if data == LOG_MAGIC else 0)
    if data and data != LOG_MAGIC:
        assert replay.damage is not None and replay.damage.reason == "torn segment header"
    else:
        assert replay.damage is None


def test_not_a_log() -> None:
    replay = decode_log(b"hello, world")
    assert replay.damage is not None and replay.damage.reason == "not a Droplet log"
    assert replay.damage.dropped_bytes == 12


def test_snapshot_records_do_not_replay_as_a_log() -> None:
    replay = decode_log(LOG_MAGIC + b"".join(encode_snapshot(1, [("a", b"x")]))[8:])
    assert replay.records == []
    assert replay.damage is not None and "does not belong in a log" in replay.damage.reason


items = st.dictionaries(keys, st.binary(max_size=100), max_size=30)


@given(st.integers(0, 2**64 - 1), items)
def test_snapshot_round_trip(segment: int, content: dict[str, bytes]) -> None:
    data = b"".join(encode_snapshot(segment, content.items()))
    assert data.startswith(SNAPSHOT_MAGIC)
    assert decode_snapshot(data) == (segment, list(content.items()))


@settings(max_examples=200)
@given(items, st.data())
def test_any_damaged_snapshot_is_refused_whole(content: dict[str, bytes],
                                               data: st.DataObject) -> None:
    snap = b"".join(encode_snapshot(7, content.items()))
    how = data.draw(st.sampled_from(["cut", "flip", "append"]))
    if how == "cut":
        damaged = snap[:data.draw(st.integers(0, len(snap) - 1))]
    elif how == "flip":
        bit = data.draw(st.integers(0, len(snap) * 8 - 1))
        flipped = bytearray(snap)
        flipped[bit // 8] ^= 1 << (bit % 8)
        damaged = bytes(flipped)
    else:
        damaged = snap + data.draw(st.binary(min_size=1, max_size=20))
    with pytest.raises(SnapshotError):
        decode_snapshot(damaged)


def test_snapshot_end_record_count_must_match() -> None:
    chunks = list(encode_snapshot(1, [("a", b"1"), ("b", b"2")]))
    without_b = b"".join(chunks[:3] + chunks[4:])  # drop one key, keep the END (count 2)
    with pytest.raises(SnapshotError, match="counts 2 keys"):
        decode_snapshot(without_b)
