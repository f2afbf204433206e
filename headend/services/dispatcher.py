"""The command dispatcher: takes queued commands from the store and sees each through to
verified or failed, and turns the supply-control policy's decisions into commands.

A command's life is the table in :mod:`headend.domain.commands`; every step is written to the
store (with its audit entry and its notices) before the next one starts:

1. ``send`` is recorded *before* the envelope goes out, so a head-end killed while it was on
   the wire finds it ``sent`` and knows the meter may have run it;
2. the stored envelope is sent through :func:`~headend.links.base.execute_confirmed` (ask
   before any resend). A command found ``sent`` or ``retrying`` after a restart is first asked
   about (the meter's last result): if the meter ran it, that is the answer and nothing is
   sent again; otherwise the same envelope goes out again, which the meter's sequence rule
   makes harmless;
3. the meter's answer is ``ack`` or ``refuse``; no answer is ``timeout`` (retried with
   back-off until the command's deadline, then ``expire``);
4. an acknowledged command is ``verify``-ed by reading the relay state back (``mismatch`` if
   it is not where the command asked for).

A failed or expired command raises a notice to operators; a verified one tells the customer
(disconnected, ready for reconnection, reconnected). One command runs per meter at a time, and
at most ``per_gateway`` per gateway (one per serial line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from headend.domain.commands import (
    CommandState,
    Kind,
    Transition,
    Trigger,
    advance,
    judge_result,
    judge_state,
    retry_delay,
)
from headend.domain.notices import Channel, QuietHours, deliver_at
from headend.domain.notices import Kind as NoticeKind
from headend.domain.policy import Action, decide
from headend.links.base import MeterLink, RetryPolicy, execute_confirmed
from headend.services.links import GatewayLines
from headend.services.poller import LinkSource
from headend.storage import Database
from headend.storage.commands import (
    Claimed,
    NoticeToSend,
    Queued,
    Recorder,
    Request,
    claim_commands,
    queue_command,
    queue_commands,
    recently_commanded,
    release_command,
)
from headend.storage.polling import PollTarget
from headend.storage.supply import policy_inputs
from protocols.clock import Clock, clock_speed
from protocols.commands import CommandResult
from protocols.disconnect import ControlState
from protocols.errors import DecodeError, DeviceException, LinkError, StorageError

log = logging.getLogger(__name__)

#: a transition to record for a claimed command, with its options (see ``Recorder.record``)
_Job = tuple[Claimed, Transition, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    attempt_timeout: float = 5.0  # real seconds one attempt may take, its resends included
    lease: float = 60.0  # real seconds a claim holds before another worker may take it over
    deadline: timedelta = timedelta(hours=1)  # head-end time a command has to be confirmed
    retry_base: timedelta = timedelta(seconds=30)  # back-off after the first unanswered attempt
    retry_most: timedelta = timedelta(minutes=10)
    per_gateway: int = 4  # commands in flight per gateway (a serial line takes one)
    batch: int = 64  # commands claimed at a time
    grace: timedelta = timedelta(hours=1)  # the policy's wait after exhaustion
    policy_retry_after: timedelta = timedelta(hours=1)  # after a failed policy command
    notice_expiry: timedelta = timedelta(hours=24)


@dataclass(slots=True)
class DispatchRound:
    """What one pass did."""

    outcomes: Counter[str] = field(default_factory=Counter)  # final state of each attempt
    queued: int = 0  # commands the policy queued
    button_notices: int = 0


class Dispatcher:
    def __init__(
        self,
        db: Database,
        links: LinkSource,
        clock: Clock,
        *,
        worker: str = "hes",
        settings: DispatchSettings | None = None,
        quiet: QuietHours | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.db = db
        self.links = links
        self.clock = clock
        self.worker = worker
        self.settings = settings or DispatchSettings()
        self.quiet = quiet or QuietHours()
        self.retry = retry
        self._lines = GatewayLines(self.settings.per_gateway)
        self.recorder = Recorder(db)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    # -- queueing ------------------------------------------------------------------------------

    async def queue(self, meter_id: str, kind: Kind, reason: str, actor: str) -> Queued:
        now = self.now()
        return await queue_command(
            self.db,
            meter_id=meter_id,
            kind=kind,
            reason=reason,
            actor=actor,
            now=now,
            expires_at=now + self.settings.deadline,
        )

    async def queue_many(self, requests: Sequence[Request]) -> list[Queued]:
        """Queue several commands in one transaction (all or none)."""
        if not requests:
            return []
        now = self.now()
        return await queue_commands(
            self.db, requests, now=now, expires_at=now + self.settings.deadline
        )

    async def apply_policy(self, result: DispatchRound | None = None) -> DispatchRound:
        """Queue the commands the policy asks for now (one per meter and kind, not again before
        a reading shows its effect: the reading's ``last_command_seq`` reaches it); returns
        what it did."""
        result = result or DispatchRound()
        now = self.now()
        async with self.db.read() as session:
            inputs = await policy_inputs(session, acting_only=True)
        decisions = [
            (row, decide(row.account, row.meter, row.calendar, now, self.settings.grace))
            for row in inputs
        ]
        acting = [
            (row, decision)
            for row, decision in decisions
            if decision.action in (Action.DISCONNECT, Action.RECONNECT, Action.ARM)
        ]
        if not acting:
            return result
        busy = await recently_commanded(
            self.db,
            {row.meter_id: row.last_command_seq for row, _ in acting},
            now - self.settings.policy_retry_after,
        )
        requests = []
        for row, decision in acting:
            kind = Kind.DISCONNECT if decision.action is Action.DISCONNECT else Kind.RECONNECT
            if (row.meter_id, kind.value) not in busy:
                requests.append(Request(row.meter_id, kind, decision.reason, "policy"))
        for request, queued in zip(requests, await self.queue_many(requests), strict=True):
            if queued.created:
                result.queued += 1
                log.info("%s: policy queued %s (%s)", request.meter_id, request.kind,
                         request.reason)  # fmt: skip
        return result

    # -- dispatching ---------------------------------------------------------------------------

    async def dispatch_once(self, meter_ids: Sequence[str] | None = None) -> DispatchRound:
        """Claim the due commands and work each one step as far as it goes now."""
        result = DispatchRound()
        now = self.now()
        lease_until = now + timedelta(seconds=self.settings.lease * clock_speed(self.clock))
        claimed = await claim_commands(
            self.db, self.worker, now, lease_until, self.settings.batch, meter_ids=meter_ids
        )
        if not claimed:
            return result
        await self._lines.work_all(claimed, self._work, result.outcomes, "command")
        return result

    async def _work(self, command: Claimed) -> str:
        """One command as far as it goes now; returns the state it is left in ('lost' when the
        fence failed: another worker or an operator took it)."""
        target = PollTarget(command.meter_id, command.endpoint, command.transport, "", 0, "")
        try:
            link = await self.links.link(target)
        except LinkError as exc:
            return await self._unanswered(command, f"the meter cannot be reached: {exc}")
        if command.state is CommandState.ACKNOWLEDGED:
            return await self._verify(command, link)
        now = self.now()
        if command.state in (CommandState.SENT, CommandState.RETRYING):
            executed = await self._ask(command, link)
            if executed is not None:
                return await self._answered(command, link, executed)
            if command.state is CommandState.SENT:  # a restart found it on the wire
                step = advance(
                    command.state, Trigger.TIMEOUT, "the head-end restarted while it was sent"
                )
                moved = await self.recorder.record(command, step, now=now, keep_lease=True)
                if moved is None:
                    return "lost"
                command = moved
        if now >= command.expires_at:
            return await self._expire(command, "its deadline passed before it was sent")
        reason = "first attempt" if command.attempts == 0 else f"attempt {command.attempts + 1}"
        sent = await self.recorder.record(
            command, advance(command.state, Trigger.SEND, reason), now=now, keep_lease=True
        )
        if sent is None:
            return "lost"
        try:
            result = await execute_confirmed(
                link, sent.envelope, self.settings.attempt_timeout, policy=self.retry
            )
        except DeviceException as exc:  # (an answer that does not decode is asked about)
            await self.links.discard(target)
            return await self._failed(sent, Trigger.REFUSE, f"the meter's answer: {exc}")
        except LinkError as exc:
            await self.links.discard(target)
            return await self._unanswered(sent, str(exc))
        return await self._answered(sent, link, result)

    async def _ask(self, command: Claimed, link: MeterLink) -> CommandResult | None:
        """The meter's result for this command if it ran it; None if it did not, or if the
        meter does not answer (then the resend asks again)."""
        try:
            async with asyncio.timeout(self.settings.attempt_timeout):
                last = await link.read_last_result()
        except (LinkError, DecodeError, TimeoutError) as exc:
            log.info("%s: asking about command %d: %s", command.meter_id, command.id, exc)
            return None
        return last if last.sequence == command.envelope.sequence else None

    async def _answered(self, command: Claimed, link: MeterLink, result: CommandResult) -> str:
        outcome = judge_result(result.code)
        if outcome.trigger is Trigger.TIMEOUT:
            return await self._unanswered(command, outcome.reason)
        if outcome.trigger is Trigger.REFUSE:
            return await self._failed(command, Trigger.REFUSE, outcome.reason, int(result.code))
        ack: _Job = (
            command,
            advance(command.state, Trigger.ACK, outcome.reason),
            {"now": self.now(), "keep_lease": True, "result_code": int(result.code)},
        )
        return await self._verify(replace(command, state=CommandState.ACKNOWLEDGED), link, ack)

    async def _verify(self, command: Claimed, link: MeterLink, ack: _Job | None = None) -> str:
        """Read the relay back and record the outcome. ``ack`` is the acknowledgement when it
        is not written yet: it goes into the verification's transaction (a head-end killed
        before that finds the command sent, asks the meter for its result and comes here
        again), or alone before a failed read-back or a mismatch is handled."""

        async def acknowledged() -> Claimed | None:
            return command if ack is None else await self.recorder.record(ack[0], ack[1], **ack[2])

        try:
            async with asyncio.timeout(self.settings.attempt_timeout):
                snapshot = await link.read_snapshot()
        except (LinkError, DecodeError, TimeoutError) as exc:
            acked = await acknowledged()
            if acked is None:
                return "lost"
            now = self.now()
            if now >= acked.expires_at:
                return await self._failed(
                    acked,
                    Trigger.MISMATCH,
                    f"executed, but the relay could not be read back before the deadline: {exc}",
                )
            # stays acknowledged; read back on the next claim
            wait = retry_delay(acked.attempts, self.settings.retry_base, self.settings.retry_most)
            await release_command(self.db, acked, now + wait, f"read-back failed: {exc}")
            return CommandState.ACKNOWLEDGED.value
        outcome = judge_state(command.kind, snapshot.control_mode, snapshot.control_state)
        if outcome.trigger is Trigger.MISMATCH:
            acked = await acknowledged()
            if acked is None:
                return "lost"
            return await self._failed(acked, Trigger.MISMATCH, outcome.reason)
        now = self.now()
        verify: _Job = (
            command,
            advance(command.state, Trigger.VERIFY, outcome.reason),
            {"now": now, "notices": [self._customer_notice(command, snapshot.control_state, now)]},
        )
        done = await self.recorder.record_steps([verify] if ack is None else [ack, verify])
        return "lost" if done is None else CommandState.VERIFIED.value

    def _customer_notice(
        self, command: Claimed, state: ControlState, now: datetime
    ) -> NoticeToSend:
        if command.kind is Kind.DISCONNECT:
            kind = NoticeKind.DISCONNECTED
            values = {"meter": command.meter_id, "reason": command.reason}
        elif state is ControlState.CONNECTED:
            kind, values = NoticeKind.RECONNECTED, {"meter": command.meter_id}
        else:
            kind, values = NoticeKind.READY_FOR_RECONNECTION, {"meter": command.meter_id}
        return NoticeToSend(
            kind.value,
            values,
            deliver_at(kind, Channel.SMS, now, self.quiet),
            now + self.settings.notice_expiry,
        )

    def _operator_notice(self, command: Claimed, reason: str, now: datetime) -> NoticeToSend:
        return NoticeToSend(
            NoticeKind.COMMAND_FAILED.value,
            {"meter": command.meter_id, "command": command.kind.value, "reason": reason},
            now,
            now + self.settings.notice_expiry,
            to_operators=True,
        )

    async def _failed(
        self, command: Claimed, trigger: Trigger, reason: str, code: int | None = None
    ) -> str:
        """Give the command up (failed, or expired for EXPIRE), telling operators."""
        now = self.now()
        step = advance(command.state, trigger, reason)
        done = await self.recorder.record(
            command,
            step,
            now=now,
            result_code=code,
            error=reason,
            notices=[self._operator_notice(command, reason, now)],
        )
        log.warning("%s: command %d %s: %s", command.meter_id, command.id, step.new, reason)
        return "lost" if done is None else step.new.value

    async def _expire(self, command: Claimed, reason: str) -> str:
        return await self._failed(command, Trigger.EXPIRE, reason)

    async def _unanswered(self, command: Claimed, reason: str) -> str:
        """No answer: try again after a back-off, or expire if that is past the deadline."""
        now = self.now()
        wait = retry_delay(
            max(command.attempts, 1), self.settings.retry_base, self.settings.retry_most
        )
        if now + wait >= command.expires_at:
            return await self._expire(command, f"no confirmation before its deadline: {reason}")
        if command.state is CommandState.QUEUED:  # never sent: the link would not open
            await release_command(self.db, command, now + wait, reason)
            return CommandState.QUEUED.value
        trigger = Trigger.TIMEOUT if command.state is CommandState.SENT else Trigger.RETRY
        done = await self.recorder.record(
            command,
            advance(command.state, trigger, f"{reason}; again in {wait.total_seconds():g} s"),
            now=now,
            next_attempt_at=now + wait,
            error=reason,
        )
        return "lost" if done is None else CommandState.RETRYING.value

    # -- running -------------------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event, tick: float = 1.0, *, policy_every: float | None = 10.0
    ) -> None:
        """Dispatch (and apply the policy every ``policy_every`` s) until ``stop``; the
        attempts in flight finish before it returns."""
        loop = asyncio.get_running_loop()
        next_policy = loop.time()
        delay = tick
        while not stop.is_set():
            try:
                if policy_every is not None and loop.time() >= next_policy:
                    next_policy = loop.time() + policy_every
                    await self.apply_policy()
                result = await self.dispatch_once()
                delay = tick if not result.outcomes else 0.0
            except StorageError as exc:
                log.error("dispatcher: %s", exc)
                delay = min(max(delay, tick) * 2, 30.0)
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
