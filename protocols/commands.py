"""Commands a head-end sends to a meter, and the meter's results. Transport independent.

A command is a frozen value: a code and its integer arguments. It travels inside a
:class:`CommandEnvelope` that adds the meter id, a per-meter strictly increasing sequence number
and an authentication tag: HMAC-SHA256 over the meter id, sequence, code and arguments with the
meter's key, truncated to :data:`TAG_BYTES`. Modbus (the command block) and MQTT (the ``cmd``
topic) carry the very same envelope, so a meter refuses the same things with the same
:class:`ResultCode` whichever way a command arrives.

Sequence numbers (the rule of DLMS invocation counters): a meter remembers the last sequence it
executed and its result, and executes a command only when its sequence is strictly greater than
that last one; any jump forward is accepted (sequences a head-end burnt on commands that never
arrived are simply skipped). The same sequence with the same content is acknowledged again with
the stored result and executed zero times (a retry after a lost answer); an older sequence, or
the same one with other content, is refused as ``REPLAYED``.

The sequence belongs to the key. A meter remembers which key its last sequence was counted under
(:func:`key_id`, a fingerprint, never the key); when the meter starts with another key, the
sequence starts again from 0 (event ``SEQUENCE_RESET``). That is the way out of the top of the
range (``U32_MAX``), keyed or keyless: install a new key (or, on a keyless meter, a first key).
It cannot be abused by a stranger: changing a key needs the meter's configuration, and commands
recorded under the old key carry tags the new key refuses, so a restart of the counter lets no
old command in again.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum

from protocols.errors import ValidationError

TAG_BYTES = 16
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class CommandCode(IntEnum):
    REMOTE_DISCONNECT = 1
    REMOTE_RECONNECT = 2
    CREDIT_TRANSFER = 3
    SET_CLOCK = 4
    SET_LOW_CREDIT_THRESHOLD = 5
    SET_CONTROL_MODE = 6
    INVOKE_EMERGENCY_CREDIT = 7
    CLEAR_TAMPER = 8
    ENTER_TOKEN = 9


class ResultCode(IntEnum):
    """What a meter answers to a command (see the result code table). 0 and 1 mean the
    command is in effect."""

    OK = 0
    DUPLICATE = 1
    REFUSED_BY_MODE = 2
    REFUSED_BY_STATE = 3
    OLD_TRANSFER = 4
    AMOUNT_OUT_OF_BOUNDS = 5
    BAD_ARGUMENT = 6
    AUTH_FAILED = 7
    REPLAYED = 8
    UNKNOWN_COMMAND = 9
    NOT_SUPPORTED = 10
    TOKEN_REFUSED = 11
    BUSY = 12
    NONE = 255

    @property
    def accepted(self) -> bool:
        return self in (ResultCode.OK, ResultCode.DUPLICATE)


#: what each result code means, in an operator's words (the generated documents show it)
RESULT_TEXT: dict[ResultCode, str] = {
    ResultCode.OK: "executed",
    ResultCode.DUPLICATE: "this credit transfer number was applied before (a retry): "
    "acknowledged again, applied zero times; the credit is in the meter once",
    ResultCode.REFUSED_BY_MODE: "the disconnect control mode does not allow this action at all",
    ResultCode.REFUSED_BY_STATE: "nothing to do from the current state (e.g. already "
    "disconnected, emergency credit not available)",
    ResultCode.OLD_TRANSFER: "a credit transfer number lower than the last one applied",
    ResultCode.AMOUNT_OUT_OF_BOUNDS: "the amount is below the minimum or above the maximum "
    "top-up, or would take the credit over its maximum",
    ResultCode.BAD_ARGUMENT: "an argument the meter cannot use, or a command for another meter",
    ResultCode.AUTH_FAILED: "the authentication tag does not match the meter's key (or is "
    "missing); nothing executed, the sequence number is not used up",
    ResultCode.REPLAYED: "the sequence number is not greater than the last one executed (or "
    "repeats it with other content); nothing executed",
    ResultCode.UNKNOWN_COMMAND: "no such command code",
    ResultCode.NOT_SUPPORTED: "the meter lacks the feature (e.g. a token on a meter without a "
    "keypad decoder)",
    ResultCode.TOKEN_REFUSED: "the token gateway refused the token; the token status says why",
    ResultCode.BUSY: "the meter cannot take a command now; send it again later",
    ResultCode.NONE: "no command executed yet",
}


@dataclass(frozen=True, slots=True)
class ArgSpec:
    name: str
    minimum: int
    maximum: int
    doc: str


#: the arguments each command takes, in order; all are non-negative integers
COMMAND_ARGS: dict[CommandCode, tuple[ArgSpec, ...]] = {
    CommandCode.REMOTE_DISCONNECT: (),
    CommandCode.REMOTE_RECONNECT: (),
    CommandCode.CREDIT_TRANSFER: (
        ArgSpec("transfer", 1, U32_MAX, "per-meter, strictly increasing transfer number"),
        ArgSpec("amount", 1, U32_MAX, "credit in the account's unit (minor currency units or Wh)"),
    ),
    CommandCode.SET_CLOCK: (ArgSpec("time", 0, U64_MAX, "seconds since 1970-01-01 UTC"),),
    CommandCode.SET_LOW_CREDIT_THRESHOLD: (
        ArgSpec("threshold", 0, U32_MAX, "in the account's unit"),
    ),
    CommandCode.SET_CONTROL_MODE: (ArgSpec("mode", 0, 6, "disconnect control mode 0..6"),),
    CommandCode.INVOKE_EMERGENCY_CREDIT: (),
    CommandCode.CLEAR_TAMPER: (),
    CommandCode.ENTER_TOKEN: (ArgSpec("token", 0, 10**20 - 1, "20-digit STS token as a number"),),
}


@dataclass(frozen=True, slots=True)
class Command:
    """A command code and its arguments, validated against :data:`COMMAND_ARGS`."""

    code: CommandCode
    args: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            code = CommandCode(self.code)
        except ValueError as exc:
            raise ValidationError(f"unknown command code {self.code!r}") from exc
        object.__setattr__(self, "code", code)
        specs = COMMAND_ARGS[code]
        if len(self.args) != len(specs):
            raise ValidationError(
                f"{code.name.lower()} takes {len(specs)} argument(s), got {len(self.args)}"
            )
        for spec, value in zip(specs, self.args, strict=True):
            if type(value) is not int or not spec.minimum <= value <= spec.maximum:
                raise ValidationError(
                    f"{code.name.lower()} {spec.name} must be an integer "
                    f"{spec.minimum}..{spec.maximum}, got {value!r}"
                )

    def arg(self, name: str) -> int:
        for spec, value in zip(COMMAND_ARGS[self.code], self.args, strict=True):
            if spec.name == name:
                return value
        raise KeyError(name)

    # convenience constructors
    @classmethod
    def credit_transfer(cls, transfer: int, amount: int) -> Command:
        return cls(CommandCode.CREDIT_TRANSFER, (transfer, amount))

    @classmethod
    def remote_disconnect(cls) -> Command:
        return cls(CommandCode.REMOTE_DISCONNECT)

    @classmethod
    def remote_reconnect(cls) -> Command:
        return cls(CommandCode.REMOTE_RECONNECT)

    @classmethod
    def set_clock(cls, time: int) -> Command:
        return cls(CommandCode.SET_CLOCK, (time,))

    @classmethod
    def enter_token(cls, token: str) -> Command:
        if len(token) != 20 or not token.isdigit():
            raise ValidationError(f"an STS token is 20 digits, got {token!r}")
        return cls(CommandCode.ENTER_TOKEN, (int(token),))


def auth_tag(key: bytes, meter_id: str, sequence: int, command: Command) -> bytes:
    """HMAC-SHA256 over ``meter_id NUL sequence(u32) code(u16) args(16 bytes each)``, truncated."""
    message = bytearray(meter_id.encode("utf-8"))
    message.append(0)
    message += sequence.to_bytes(4, "big")
    message += int(command.code).to_bytes(2, "big")
    for value in command.args:
        message += value.to_bytes(16, "big")
    return hmac.new(key, bytes(message), hashlib.sha256).digest()[:TAG_BYTES]


def key_id(key: bytes | None) -> str:
    """A fingerprint naming a command key (16 hex digits); "" for a meter without a key.

    Stored beside the meter's last sequence so that a key change restarts the sequence; the key
    itself cannot be recovered from it.
    """
    if not key:
        return ""
    return hashlib.sha256(b"prepaid-hes key id\0" + key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CommandEnvelope:
    """A command addressed to one meter with its sequence number and authentication tag.

    ``tag`` is empty for an unauthenticated command (accepted only by a meter without a key).
    """

    meter_id: str
    sequence: int
    command: Command
    tag: bytes = b""

    def __post_init__(self) -> None:
        if type(self.sequence) is not int or not 1 <= self.sequence <= U32_MAX:
            raise ValidationError(f"a command sequence is 1..{U32_MAX}, got {self.sequence!r}")
        if self.tag and len(self.tag) != TAG_BYTES:
            raise ValidationError(f"an authentication tag has {TAG_BYTES} bytes")

    @classmethod
    def signed(
        cls, meter_id: str, sequence: int, command: Command, key: bytes | None
    ) -> CommandEnvelope:
        tag = auth_tag(key, meter_id, sequence, command) if key else b""
        return cls(meter_id, sequence, command, tag)

    def verify(self, key: bytes | None) -> bool:
        """True when the tag matches ``key``; a meter without a key accepts any envelope."""
        if not key:
            return True
        if not self.tag:
            return False
        return hmac.compare_digest(
            self.tag, auth_tag(key, self.meter_id, self.sequence, self.command)
        )


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A meter's answer: the sequence it answers, the result, and what a master needs to confirm."""

    sequence: int
    code: ResultCode
    last_transfer: int = 0  # the last credit transfer number the meter has applied
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.code.accepted
