from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.commands import (
    COMMAND_ARGS,
    TAG_BYTES,
    Command,
    CommandCode,
    CommandEnvelope,
    ResultCode,
    auth_tag,
    key_id,
)
from protocols.errors import ValidationError

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")


def test_every_code_has_an_argument_table() -> None:
    assert set(COMMAND_ARGS) == set(CommandCode)


@pytest.mark.parametrize(
    ("code", "args"),
    [
        (CommandCode.CREDIT_TRANSFER, (1,)),
        (CommandCode.CREDIT_TRANSFER, (0, 100)),
        (CommandCode.CREDIT_TRANSFER, (1, 0)),
        (CommandCode.CREDIT_TRANSFER, (1, 2**32)),
        (CommandCode.SET_CONTROL_MODE, (7,)),
        (CommandCode.REMOTE_DISCONNECT, (1,)),
        (99, ()),
    ],
)
def test_bad_commands_are_refused(code: int, args: tuple[int, ...]) -> None:
    with pytest.raises(ValidationError):
        Command(code, args)  # type: ignore[arg-type]


def test_float_argument_refused() -> None:
    with pytest.raises(ValidationError):
        Command(CommandCode.CREDIT_TRANSFER, (1, 10.5))  # type: ignore[arg-type]


def test_token_command() -> None:
    command = Command.enter_token("12345678901234567890")
    assert command.arg("token") == 12345678901234567890
    with pytest.raises(ValidationError):
        Command.enter_token("1234")


def test_tag_binds_every_field() -> None:
    command = Command.credit_transfer(7, 500)
    envelope = CommandEnvelope.signed("MTR-1", 3, command, KEY)
    assert len(envelope.tag) == TAG_BYTES
    assert envelope.verify(KEY)
    assert not envelope.verify(b"other key")
    for forged in (
        CommandEnvelope("MTR-2", 3, command, envelope.tag),
        CommandEnvelope("MTR-1", 4, command, envelope.tag),
        CommandEnvelope("MTR-1", 3, Command.credit_transfer(7, 501), envelope.tag),
        CommandEnvelope("MTR-1", 3, command),
    ):
        assert not forged.verify(KEY)
    assert CommandEnvelope("MTR-1", 3, command).verify(None)


def test_envelope_validation() -> None:
    with pytest.raises(ValidationError):
        CommandEnvelope("M", 0, Command.remote_disconnect())
    with pytest.raises(ValidationError):
        CommandEnvelope("M", 1, Command.remote_disconnect(), b"short")


def test_result_codes() -> None:
    assert ResultCode.OK.accepted
    assert ResultCode.DUPLICATE.accepted
    assert not ResultCode.REPLAYED.accepted


@given(st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1))
def test_tag_is_deterministic(seq: int, transfer: int, amount: int) -> None:
    command = Command.credit_transfer(transfer, amount)
    assert auth_tag(KEY, "M", seq, command) == auth_tag(KEY, "M", seq, command)
    assert CommandEnvelope.signed("M", seq, command, KEY).verify(KEY)


def test_key_id_names_a_key_without_revealing_it() -> None:
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert key_id(None) == key_id(b"") == ""
    assert len(key_id(key)) == 16
    assert key_id(key) == key_id(bytes(key))
    assert key_id(key) != key_id(b"\x01" + key[1:])
    assert key.hex()[:16] not in key_id(key)
