"""The one interface the poller and the policies use to talk to a meter, whatever the transport,
and the one way a command is confirmed over it.

A :class:`MeterLink` offers primitive operations only: reads, sending a command envelope once
(:meth:`MeterLink.send_envelope`) and reading the meter's last command result
(:meth:`MeterLink.read_last_result`). :func:`execute_confirmed` builds "ask before resending"
on top of them, the same for every transport:

* the envelope is sent; when the attempt fails (a time-out, a dropped connection, a lost
  answer), the link waits a back-off with jitter and, **before any resend**, reads the meter's
  last result: if the meter already executed this sequence number, that result is the answer
  and nothing is sent again;
* otherwise the envelope is sent again (safe: a meter executes a sequence number at most once
  and answers a repeat with its stored result), until the total ``timeout`` is spent, retries
  included;
* an answer that does not decode (:class:`~protocols.errors.DecodeError`: a payload corrupted
  on its way, a frame cut short) is taken as a lost one: the meter may well have executed the
  command, so it is asked for its last result before anything is resent, and the command is
  confirmed only by an answer that decodes;
* the meter refusing the envelope itself at the protocol level
  (:class:`~protocols.errors.DeviceException`) ends it at once: resending would change nothing.

Implementations (Modbus TCP, Modbus RTU, MQTT, in-memory) translate their library's exceptions
into :mod:`protocols.errors`; nothing foreign leaks out of a link.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Final, Protocol

from protocols.commands import Command, CommandEnvelope, CommandResult
from protocols.errors import (
    ConfigError,
    DecodeError,
    DeviceException,
    LinkError,
    LinkTimeout,
    ValidationError,
)
from protocols.readings import Event, MeterSnapshot, ProfileRow

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT: Final = 5.0


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

    async def send_envelope(self, envelope: CommandEnvelope, timeout: float) -> CommandResult:
        """Send ``envelope`` once and return the meter's result for its sequence number, waiting
        at most ``timeout`` seconds; a :class:`~protocols.errors.LinkError` when no result
        arrives (the command may or may not have been executed). Never resends by itself."""
        ...

    async def read_last_result(self) -> CommandResult:
        """The result of the last command the meter executed or refused."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How :func:`execute_confirmed` waits between attempts: ``backoff`` seconds, doubled after
    each failure up to ``max_backoff``, each wait spread by ``±jitter`` (a fraction), so that
    many head-end workers retrying one gateway do not retry in step."""

    backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.backoff < 0 or self.max_backoff < self.backoff or not 0 <= self.jitter < 1:
            raise ConfigError("back-off is 0 <= backoff <= max_backoff, jitter 0 <= j < 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait after the ``attempt``-th failure (0 for the first)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 64))
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


_rng = random.Random()


async def execute_confirmed(
    link: MeterLink,
    envelope: CommandEnvelope,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
    *,
    policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
) -> CommandResult:
    """Send ``envelope`` over ``link`` and return the meter's confirmed result for its sequence
    number, asking before any resend (see the module's docstring); ``timeout`` is the total
    deadline, retries included.

    Raises ValidationError for an envelope addressed to another meter than the link's,
    LinkTimeout when no confirmation arrives in time (answers that did not decode included:
    its message says so), DeviceException at once when the meter refuses the envelope."""
    if link.meter_id and envelope.meter_id != link.meter_id:  # else send_envelope checks
        raise ValidationError(
            f"the envelope is for meter {envelope.meter_id}, this link reaches {link.meter_id}"
        )
    if not timeout > 0:
        raise ConfigError(f"a command time-out is positive, got {timeout!r}")
    policy = policy or RetryPolicy()
    rng = rng or _rng
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    attempt = 0
    sent = False
    send_error: BaseException | None = None  # why the last send went unconfirmed
    while True:
        remaining = deadline - loop.time()
        try:
            if sent:
                # the envelope may have been executed and only its answer lost: ask first
                async with asyncio.timeout_at(deadline):
                    last = await link.read_last_result()
                if last.sequence == envelope.sequence:
                    log.info("%s: sequence %d was executed before", link.meter_id, last.sequence)
                    return last
            sent = True
            # leave a quarter of the time (at most a second) to ask after a lost answer
            window = max(remaining - min(1.0, remaining / 4), remaining / 2)
            try:
                async with asyncio.timeout_at(deadline):
                    return await link.send_envelope(envelope, window)
            except DeviceException:
                raise
            except (LinkError, DecodeError, TimeoutError) as exc:
                send_error = exc
                raise
        except DeviceException:
            raise
        # a DecodeError too: the answer was spoilt on its way, so ask the meter
        except (LinkError, DecodeError, TimeoutError) as exc:
            error: BaseException = exc
        delay = policy.delay(attempt, rng)
        attempt += 1
        if loop.time() + delay >= deadline:
            reason = send_error or error
            raise LinkTimeout(
                f"{link.meter_id}: no confirmation of command {envelope.sequence} "
                f"within {timeout:g} s: {str(reason) or 'no answer'}"
            ) from error
        log.info("%s: command %d: %s; asking again", link.meter_id, envelope.sequence, error)
        await asyncio.sleep(delay)


class ConfirmedExecution:
    """Gives a link class ``execute(envelope, timeout)``: :func:`execute_confirmed` on itself."""

    async def execute(
        self: MeterLink, envelope: CommandEnvelope, timeout: float = DEFAULT_COMMAND_TIMEOUT
    ) -> CommandResult:
        """Send ``envelope`` and return its confirmed result (:func:`execute_confirmed`)."""
        return await execute_confirmed(self, envelope, timeout)


async def send_command(
    link: MeterLink,
    command: Command,
    key: bytes | None,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
) -> CommandResult:
    """Send ``command`` with the next sequence number after the meter's last one.

    For an operator's one-off command; the head-end's command service keeps its own sequence
    numbers in its database instead of asking the meter.
    """
    snapshot = await link.read_snapshot()
    envelope = CommandEnvelope.signed(link.meter_id, snapshot.last_command_seq + 1, command, key)
    return await execute_confirmed(link, envelope, timeout)
