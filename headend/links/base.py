"""The one interface the poller and the policies use to talk to a meter, whatever the transport.

Implementations (Modbus TCP, Modbus RTU, MQTT) translate their library's exceptions into
:class:`protocols.errors.LinkError` subclasses; nothing foreign leaks out of a link.
"""

from __future__ import annotations

from typing import Protocol

from protocols.commands import Command, CommandEnvelope, CommandResult
from protocols.readings import Event, MeterSnapshot, ProfileRow


class MeterLink(Protocol):
    """A connection to one meter."""

    meter_id: str

    async def read_snapshot(self) -> MeterSnapshot:
        """The standard readings at this moment."""
        ...

    async def read_profile(self, start: int, end: int) -> list[ProfileRow]:
        """Load-profile rows with ``start <= time <= end`` (meter clock, epoch seconds)."""
        ...

    async def read_events(self, since_seq: int, limit: int = 100) -> list[Event]:
        """Events with ``seq > since_seq``, oldest first, at most ``limit``."""
        ...

    async def execute(self, envelope: CommandEnvelope, timeout: float = 5.0) -> CommandResult:
        """Send a command and return the meter's confirmed result for that sequence number.

        A time-out or a dropped connection is retried by first asking the meter for its last
        result: if the meter already executed this sequence, that result is returned and the
        command is not sent again, so a command is executed at most once. Raises
        :class:`~protocols.errors.LinkError` when no confirmation arrives in time.
        """
        ...

    async def close(self) -> None: ...


async def send_command(
    link: MeterLink, command: Command, key: bytes | None, timeout: float = 5.0
) -> CommandResult:
    """Send ``command`` with the next sequence number after the meter's last one.

    For an operator's one-off command; the head-end's command service keeps its own sequence
    numbers in its database instead of asking the meter.
    """
    snapshot = await link.read_snapshot()
    envelope = CommandEnvelope.signed(link.meter_id, snapshot.last_command_seq + 1, command, key)
    return await link.execute(envelope, timeout)
