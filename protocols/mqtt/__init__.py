"""MQTT, version 1: the topic scheme, the payload schemas and their codecs. Pure: no I/O.

Every topic lives under a configurable prefix and carries the scheme's version, so a v2 can run
beside v1 on the same broker::

    <prefix>/v1/meters/<meter-id>/telemetry    meter -> head-end   QoS 1   periodic readings
    <prefix>/v1/meters/<meter-id>/events       meter -> head-end   QoS 1   one event log entry
    <prefix>/v1/meters/<meter-id>/state        meter -> head-end   QoS 1   retained; online/offline
    <prefix>/v1/meters/<meter-id>/cmd          head-end -> meter   QoS 1   a command envelope
    <prefix>/v1/meters/<meter-id>/cmd/result   meter -> head-end   QoS 1   the command's result
    <prefix>/v1/meters/<meter-id>/req          head-end -> meter   QoS 1   a read request
    <prefix>/v1/meters/<meter-id>/reply        meter -> head-end   QoS 1   the request's reply
    <prefix>/v1/deadletter                     head-end            QoS 1   malformed messages

A meter publishes and subscribes only under its own ``<prefix>/v1/meters/<meter-id>/`` (the
broker's ACL enforces it); the head-end may use every topic, and its workers may subscribe
through MQTT shared subscriptions ``$share/<group>/<filter>`` to split the load.

Payloads are JSON objects defined once here as msgspec Structs; each carries ``"v": 1`` and the
meter id, and the same schema validates them at both ends. Unknown fields are ignored (a later
v1 may add optional fields); wrong types, out-of-range values and a different version are
refused. Every ``decode_*`` returns a payload or raises :class:`~protocols.errors.DecodeError`,
never anything else, whatever the bytes.

De-duplication keys (QoS 1 delivers at least once; a meter agent re-sends what the broker did
not acknowledge): telemetry ``(meter_id, boot, n)`` where ``boot`` names one run of the meter's
agent and ``n`` counts its telemetry from 1, in order; events ``(meter_id, seq)`` (the event
log's lifelong sequence); command results ``(meter_id, sequence)``.

The package's modules: :mod:`~protocols.mqtt.topics` (the topic tree, the topic table),
:mod:`~protocols.mqtt.payloads` (the payload schemas and their codecs) and
:mod:`~protocols.mqtt.broker` (broker settings and meters' credentials). Every public name is
re-exported here (``from protocols.mqtt import TopicScheme``). ``docs/mqtt.md`` is generated
from them by ``python -m cli.gendocs``.
"""

from __future__ import annotations

from protocols.meter_id import METER_ID_PATTERN, MeterId, check_meter_id
from protocols.mqtt.broker import (
    BrokerSettings,
    meter_password,
)
from protocols.mqtt.payloads import (
    I64,
    U16,
    U32,
    U63,
    CommandMessage,
    Counter,
    ErrorReply,
    EventItem,
    EventMessage,
    EventsReply,
    EventsRequest,
    LastResultReply,
    LastResultRequest,
    MeterIdText,
    ProfileItem,
    ProfileReply,
    ProfileRequest,
    Reading,
    Reply,
    Request,
    ResultItem,
    ResultMessage,
    Seq32,
    SnapshotReply,
    SnapshotRequest,
    StateMessage,
    Telemetry,
    Version,
    decode,
    decode_command,
    decode_command_message,
    decode_event,
    decode_reply,
    decode_request,
    decode_result,
    decode_state,
    decode_telemetry,
    encode,
    encode_command,
    encode_event,
    encode_reply,
    encode_request,
    encode_result,
    encode_state,
    encode_telemetry,
)
from protocols.mqtt.topics import (
    CONTENT_TYPE,
    DEFAULT_PREFIX,
    MAX_REPLY_ITEMS,
    SCHEMA_PROPERTY,
    SCHEMA_PROPERTY_VALUE,
    SCHEMA_VERSION,
    TOPIC_SPECS,
    TOPIC_VERSION,
    TopicKind,
    TopicScheme,
    TopicSpec,
)

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_PREFIX",
    "I64",
    "MAX_REPLY_ITEMS",
    "METER_ID_PATTERN",
    "SCHEMA_PROPERTY",
    "SCHEMA_PROPERTY_VALUE",
    "SCHEMA_VERSION",
    "TOPIC_SPECS",
    "TOPIC_VERSION",
    "U16",
    "U32",
    "U63",
    "BrokerSettings",
    "CommandMessage",
    "Counter",
    "ErrorReply",
    "EventItem",
    "EventMessage",
    "EventsReply",
    "EventsRequest",
    "LastResultReply",
    "LastResultRequest",
    "MeterId",
    "MeterIdText",
    "ProfileItem",
    "ProfileReply",
    "ProfileRequest",
    "Reading",
    "Reply",
    "Request",
    "ResultItem",
    "ResultMessage",
    "Seq32",
    "SnapshotReply",
    "SnapshotRequest",
    "StateMessage",
    "Telemetry",
    "TopicKind",
    "TopicScheme",
    "TopicSpec",
    "Version",
    "check_meter_id",
    "decode",
    "decode_command",
    "decode_command_message",
    "decode_event",
    "decode_reply",
    "decode_request",
    "decode_result",
    "decode_state",
    "decode_telemetry",
    "encode",
    "encode_command",
    "encode_event",
    "encode_reply",
    "encode_request",
    "encode_result",
    "encode_state",
    "encode_telemetry",
    "meter_password",
]
