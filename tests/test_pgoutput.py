"""The pgoutput decoder, on messages captured from a PostgreSQL 15 server.

The bytes come from ``pg_logical_slot_peek_binary_changes(..., 'proto_version', '1',
'publication_names', ..., 'messages', 'true')`` on a table ``cap_t (id int PRIMARY KEY,
parent int, note text, big text)``, under REPLICA IDENTITY FULL and DEFAULT.
"""

from __future__ import annotations

import pytest

from rowsync import pgoutput
from rowsync.pgoutput import UNCHANGED, Column

CAPTURED = {
    "begin": "420000000004bc8cf8000304e9bde3bcb500004939",
    "commit": "43000000000004bc8cf80000000004bc8d28000304e9bde3bcb5",
    "relation_full": "52000040137075626c6963006361705f74006600040169640000000017ffffffff01706172"
    "656e740000000017ffffffff016e6f74650000000019ffffffff016269670000000019ffffffff",
    "insert": "49000040134e00047400000001346e7400000002c3a9740000000178",
    "update_full": "55000040134f00047400000001346e7400000002c3a97400000001784e00047400000001"
    "347400000001377400000002c3a9740000000178",
    "delete_full": "44000040134f00047400000001347400000001377400000002c3a9740000000178",
    "update_toast_unchanged": "55000040134e00047400000001327400000002313074000000016d75",
    "update_key_changed": "55000040134b00047400000001326e6e6e4e0004740000000133740000000231307400"
    "0000016d75",
    "message": "4d000000000004bd2ec0726f7773796e630000000003746f6b",
    "truncate": "54000000010000004013",
}


def decoded(name: str) -> pgoutput.Decoded:
    return pgoutput.decode(bytes.fromhex(CAPTURED[name]))


def test_begin_carries_the_commit_lsn_and_the_transaction_id() -> None:
    begin = decoded("begin")
    assert isinstance(begin, pgoutput.Begin)
    assert (begin.final_lsn, begin.xid) == (79465720, 18745)


def test_commit_lsn_is_the_begin_final_lsn() -> None:
    commit = decoded("commit")
    assert isinstance(commit, pgoutput.Commit)
    assert (commit.lsn, commit.end_lsn) == (79465720, 79465768)
    begin = decoded("begin")
    assert isinstance(begin, pgoutput.Begin)
    assert commit.timestamp_us == begin.timestamp_us


def test_relation_names_columns_types_and_the_replica_identity() -> None:
    assert decoded("relation_full") == pgoutput.Relation(
        16403,
        "public",
        "cap_t",
        "f",
        (
            Column("id", 23, True),
            Column("parent", 23, True),
            Column("note", 25, True),
            Column("big", 25, True),
        ),
    )


def test_insert_holds_text_values_and_nulls() -> None:
    assert decoded("insert") == pgoutput.Insert(16403, (b"4", None, "é".encode(), b"x"))


def test_update_under_full_identity_carries_the_whole_old_row() -> None:
    assert decoded("update_full") == pgoutput.Update(
        16403,
        (b"4", None, "é".encode(), b"x"),
        False,
        (b"4", b"7", "é".encode(), b"x"),
    )


def test_delete_under_full_identity_carries_the_whole_old_row() -> None:
    assert decoded("delete_full") == pgoutput.Delete(16403, (b"4", b"7", "é".encode(), b"x"), False)


def test_an_unchanged_toasted_value_is_told_apart_from_null() -> None:
    update = decoded("update_toast_unchanged")
    assert update == pgoutput.Update(16403, None, False, (b"2", b"10", b"m", UNCHANGED))


def test_a_changed_key_sends_the_old_key_only() -> None:
    assert decoded("update_key_changed") == pgoutput.Update(
        16403, (b"2", None, None, None), True, (b"3", b"10", b"m", UNCHANGED)
    )


def test_logical_message_and_truncate() -> None:
    assert decoded("message") == pgoutput.Message(False, 79507136, "rowsync", b"tok")
    assert decoded("truncate") == pgoutput.Truncate((16403,), False, False)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Z",
        bytes.fromhex(CAPTURED["insert"])[:-1],
        bytes.fromhex(CAPTURED["commit"]) + b"\0",
        bytes.fromhex(CAPTURED["relation_full"]).replace(b"\0", b"", 1)[:12],
        bytes.fromhex("49000040134e0001" + "78"),
    ],
    ids=["empty", "unknown-kind", "truncated", "trailing", "unterminated", "bad-column-kind"],
)
def test_anything_else_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(pgoutput.DecodeError):
        pgoutput.decode(data)


def _insert(*fields: bytes) -> bytes:
    """An Insert of relation 1 whose tuple holds ``fields`` (each already encoded)."""
    return b"I" + (1).to_bytes(4, "big") + b"N" + len(fields).to_bytes(2, "big") + b"".join(fields)


def _text(value: bytes) -> bytes:
    return b"t" + len(value).to_bytes(4, "big") + value


def test_a_value_is_read_by_its_length_whatever_bytes_it_holds() -> None:
    # bytes that look like kinds, a terminator or a length, an empty text, then a NULL and
    # an unchanged value: each field is found by the length of the one before it
    tricky = (b"n", b"\0t\0\0\0\x09u", "é€😀".encode(), b"")
    data = _insert(*map(_text, tricky), b"n", b"u")

    assert pgoutput.decode(data) == pgoutput.Insert(1, (*tricky, None, UNCHANGED))


@pytest.mark.parametrize(
    "data",
    [
        _insert(_text(b"abc"))[:-1],  # a value cut short
        _insert(b"t" + (-1).to_bytes(4, "big", signed=True)),  # a negative length
        _insert(b"t\0\0"),  # a length cut short
        _insert(_text(b"a"), b"n")[:-1],  # a field missing
        b"M\x01" + (0).to_bytes(8, "big") + b"\xff\0" + (0).to_bytes(4, "big"),  # not UTF-8
    ],
    ids=["value", "negative-length", "length", "field", "prefix-not-utf8"],
)
def test_a_damaged_tuple_or_name_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(pgoutput.DecodeError):
        pgoutput.decode(data)
