"""MQTT version 1 topics: the topic tree under a prefix, and the meter id rule. Pure: no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final

from protocols.errors import DecodeError, ValidationError
from protocols.meter_id import check_meter_id, is_meter_id

SCHEMA_VERSION: Final = 1
TOPIC_VERSION: Final = f"v{SCHEMA_VERSION}"
DEFAULT_PREFIX: Final = "phs"
CONTENT_TYPE: Final = "application/json"
#: MQTT 5 user property that names the payload schema version on every message
SCHEMA_PROPERTY: Final = "schema"
SCHEMA_PROPERTY_VALUE: Final = str(SCHEMA_VERSION)
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: the most events or profile rows one reply carries
MAX_REPLY_ITEMS: Final = 3000


# -- topics ---------------------------------------------------------------------------------------


class TopicKind(Enum):
    """The last level(s) of a meter's topics."""

    TELEMETRY = "telemetry"
    EVENTS = "events"
    STATE = "state"
    CMD = "cmd"
    CMD_RESULT = "cmd/result"
    REQUEST = "req"
    REPLY = "reply"


_KIND_BY_SUFFIX = {kind.value: kind for kind in TopicKind}


@dataclass(frozen=True, slots=True)
class TopicScheme:
    """The version-1 topic tree under ``prefix`` (one or more levels, e.g. ``utility/site-1``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not all(
            _PREFIX_LEVEL.fullmatch(level) for level in self.prefix.split("/")
        ):
            raise ValidationError(
                f"a topic prefix is levels of letters, digits, _ . - joined by /, "
                f"got {self.prefix!r}"
            )

    @property
    def base(self) -> str:
        """``<prefix>/v1/meters``: the parent of every meter's topics."""
        return f"{self.prefix}/{TOPIC_VERSION}/meters"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}/{TOPIC_VERSION}/deadletter"

    def meter_root(self, meter_id: str) -> str:
        return f"{self.base}/{check_meter_id(meter_id)}"

    def topic(self, meter_id: str, kind: TopicKind) -> str:
        return f"{self.meter_root(meter_id)}/{kind.value}"

    def telemetry(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.TELEMETRY)

    def events(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.EVENTS)

    def state(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.STATE)

    def cmd(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.CMD)

    def cmd_result(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.CMD_RESULT)

    def request(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.REQUEST)

    def reply(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.REPLY)

    def all_meters(self, kind: TopicKind) -> str:
        """The filter for ``kind`` of every meter: ``<prefix>/v1/meters/+/<kind>``."""
        return f"{self.base}/+/{kind.value}"

    def shared(self, kind: TopicKind, group: str | None) -> str:
        """:meth:`all_meters`, as the MQTT 5 shared subscription ``$share/<group>/...`` if a
        group is given: the broker hands each message to one subscriber of the group."""
        plain = self.all_meters(kind)
        if group is None:
            return plain
        if not _SHARE_GROUP.fullmatch(group):
            raise ValidationError(f"a shared-subscription group is a plain name, got {group!r}")
        return f"$share/{group}/{plain}"

    def acl_pattern(self) -> str:
        """The Mosquitto ACL pattern that confines a meter (user name = meter id) to its tree."""
        return f"{self.base}/%u/#"

    def parse(self, topic: str) -> tuple[str, TopicKind]:
        """``(meter_id, kind)`` of a meter topic; DecodeError for any other topic."""
        head = self.base + "/"
        if not isinstance(topic, str) or not topic.startswith(head):
            raise DecodeError(f"not a topic of {self.base}: {topic!r}")
        meter_id, _, suffix = topic[len(head) :].partition("/")
        kind = _KIND_BY_SUFFIX.get(suffix)
        if kind is None or not is_meter_id(meter_id):
            raise DecodeError(f"not a meter topic: {topic!r}")
        return meter_id, kind

    def owns(self, meter_id: str, topic: str) -> bool:
        """True when ``topic`` lies in ``meter_id``'s own tree (where its ACL lets it publish)."""
        root = self.meter_root(meter_id) + "/"
        return topic.startswith(root) and not any(c in topic for c in "+#\0")


@dataclass(frozen=True, slots=True)
class TopicSpec:
    kind: TopicKind | None
    topic: str
    direction: str
    qos: int
    retain: bool
    payload: str
    properties: str
    key: str
    doc: str


TOPIC_SPECS: Final[tuple[TopicSpec, ...]] = (
    TopicSpec(
        TopicKind.TELEMETRY,
        "<prefix>/v1/meters/<meter-id>/telemetry",
        "meter → head-end",
        1,
        False,
        "Telemetry",
        "user property `schema`",
        "(meter_id, boot, n)",
        "Readings every telemetry interval. Produced even while offline: the agent buffers them "
        "(bounded, oldest dropped first) and sends them in order after reconnecting.",
    ),
    TopicSpec(
        TopicKind.EVENTS,
        "<prefix>/v1/meters/<meter-id>/events",
        "meter → head-end",
        1,
        False,
        "EventMessage",
        "user property `schema`",
        "(meter_id, event.seq)",
        "One event log entry, as it happens (buffered like telemetry while offline).",
    ),
    TopicSpec(
        TopicKind.STATE,
        "<prefix>/v1/meters/<meter-id>/state",
        "meter → head-end",
        1,
        True,
        "StateMessage",
        "user property `schema`; set as the connection's last will",
        "latest wins",
        "`online` after each connection; `offline` as the last will (the broker publishes it "
        "when the meter vanishes) or before a clean disconnect.",
    ),
    TopicSpec(
        TopicKind.CMD,
        "<prefix>/v1/meters/<meter-id>/cmd",
        "head-end → meter",
        1,
        False,
        "CommandMessage",
        "response topic, correlation data, message expiry interval, user property `schema`",
        "(meter_id, sequence)",
        "A command envelope. The meter keeps a persistent session (clean start off, session "
        "expiry set), so a command sent while it is offline is delivered when it returns, "
        "unless its message expiry has passed. The meter executes each sequence at most once.",
    ),
    TopicSpec(
        TopicKind.CMD_RESULT,
        "<prefix>/v1/meters/<meter-id>/cmd/result",
        "meter → head-end",
        1,
        False,
        "ResultMessage",
        "correlation data (copied from the command), user property `schema`",
        "(meter_id, result.sequence)",
        "The result, published to the command's response topic when that lies in this subtree "
        "(`<prefix>/v1/meters/<meter-id>/cmd/result` or `…/cmd/result/<anything>`), else here: "
        "a response topic anywhere else (the meter's telemetry topic, another meter's tree) is "
        "not used.",
    ),
    TopicSpec(
        TopicKind.REQUEST,
        "<prefix>/v1/meters/<meter-id>/req",
        "head-end → meter",
        1,
        False,
        "Request (op: snapshot, events, profile, last_result)",
        "response topic, correlation data, message expiry interval, user property `schema`",
        "correlation data",
        "A read request; reading changes nothing in the meter.",
    ),
    TopicSpec(
        TopicKind.REPLY,
        "<prefix>/v1/meters/<meter-id>/reply",
        "meter → head-end",
        1,
        False,
        "Reply (op: snapshot, events, profile, last_result, error)",
        "correlation data (copied from the request), user property `schema`",
        "correlation data",
        "The reply, published to the request's response topic when that lies in this subtree "
        "(`<prefix>/v1/meters/<meter-id>/reply` or `…/reply/<anything>`), else here: a "
        "response topic anywhere else is not used.",
    ),
    TopicSpec(
        None,
        "<prefix>/v1/deadletter",
        "head-end → operators",
        1,
        False,
        "the original bytes, unchanged",
        "user properties `original-topic`, `reason`, `schema`",
        "none",
        "Messages the ingest could not accept (not JSON, wrong schema, wrong version, a meter "
        "id that does not match the topic), republished as they came, with the reason.",
    ),
)
