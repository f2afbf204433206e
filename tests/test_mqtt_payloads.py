"""The MQTT topic scheme and payload codecs (protocols.mqtt): vectors, round trips, fuzz, docs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.docs import mqtt as mqtt_docs
from protocols import mqtt
from protocols.commands import (
    COMMAND_ARGS,
    Command,
    CommandCode,
    CommandEnvelope,
    CommandResult,
    ResultCode,
)
from protocols.disconnect import ControlState
from protocols.errors import ConfigError, DecodeError, ValidationError
from protocols.mqtt import (
    BrokerSettings,
    EventsRequest,
    LastResultReply,
    ProfileReply,
    SnapshotReply,
    TopicKind,
    TopicScheme,
)
from protocols.readings import Event, EventCode, MeterSnapshot, ProfileRow, StatusFlag

ROOT = Path(__file__).resolve().parent.parent

SNAPSHOT = MeterSnapshot(
    meter_id="MTR-0001",
    time=1_767_225_600,
    energy_import_wh=1234,
    energy_rates_wh=(1000, 234, 0, 0),
    power_w=450,
    voltage_dv=2301,
    current_ma=1960,
    power_factor_milli=998,
    frequency_chz=5000,
    credit=9_950,
    emergency_credit=0,
    debt=0,
    credit_unit=2,
    currency="KES",
    currency_scale=-2,
    low_credit_threshold=5000,
    control_state=ControlState.CONNECTED,
    control_mode=6,
    status=StatusFlag.IN_CREDIT | StatusFlag.FRIENDLY_PERIOD,
    last_event_seq=3,
    last_transfer=2,
    last_command_seq=5,
)

TELEMETRY_VECTOR = (
    b'{"v":1,"meter_id":"MTR-0001","boot":77,"n":5,"reading":{"time":1767225600,'
    b'"energy_import_wh":1234,"energy_rates_wh":[1000,234,0,0],"power_w":450,'
    b'"voltage_dv":2301,"current_ma":1960,"power_factor_milli":998,"frequency_chz":5000,'
    b'"credit":9950,"emergency_credit":0,"debt":0,"credit_unit":2,"currency":"KES",'
    b'"currency_scale":-2,"low_credit_threshold":5000,"control_state":1,"control_mode":6,'
    b'"status":17,'
    b'"last_event_seq":3,"last_transfer":2,"last_command_seq":5}}'
)
KEY = bytes(range(16))


# -- fixed vectors --------------------------------------------------------------------------------


def test_telemetry_vector_both_ways() -> None:
    assert mqtt.encode_telemetry(SNAPSHOT, boot=77, n=5) == TELEMETRY_VECTOR
    decoded = mqtt.decode_telemetry(TELEMETRY_VECTOR)
    assert decoded.key == ("MTR-0001", 77, 5)
    assert decoded.snapshot() == SNAPSHOT


def test_command_vector_carries_the_modbus_envelope() -> None:
    envelope = CommandEnvelope.signed("MTR-0001", 9, Command.credit_transfer(4, 2500), KEY)
    data = mqtt.encode_command(envelope)
    assert json.loads(data) == {
        "v": 1,
        "meter_id": "MTR-0001",
        "sequence": 9,
        "code": 3,
        "args": [4, 2500],
        "tag": envelope.tag.hex(),
    }
    decoded = mqtt.decode_command(data)
    assert decoded == envelope
    assert decoded.verify(KEY)


def test_a_token_argument_beyond_64_bits_survives() -> None:
    envelope = CommandEnvelope.signed(
        "MTR-0001", 1, Command.enter_token("99999999999999999999"), None
    )
    data = mqtt.encode_command(envelope)
    assert b"99999999999999999999" in data
    assert mqtt.decode_command(data) == envelope


def test_result_and_event_vectors() -> None:
    result = CommandResult(9, ResultCode.OLD_TRANSFER, 4, "transfer 3 is older than 4")
    data = mqtt.encode_result("MTR-0001", result)
    assert json.loads(data) == {
        "v": 1,
        "meter_id": "MTR-0001",
        "result": {
            "sequence": 9,
            "code": 4,
            "last_transfer": 4,
            "detail": "transfer 3 is older than 4",
        },
    }
    assert mqtt.decode_result(data).result.to_result() == result
    event = Event(12, 1_767_225_700, EventCode.TOPUP_ACCEPTED, 4, 2500)
    data = mqtt.encode_event("MTR-0001", event)
    assert data == (
        b'{"v":1,"meter_id":"MTR-0001","event":'
        b'{"seq":12,"time":1767225700,"code":30,"a":4,"b":2500}}'
    )
    assert mqtt.decode_event(data).event.to_event() == event
    assert mqtt.decode_event(data).key == ("MTR-0001", 12)


def test_state_vector() -> None:
    data = mqtt.encode_state("MTR-0001", False, 5)
    assert data == b'{"v":1,"meter_id":"MTR-0001","state":"offline","boot":5}'
    assert not mqtt.decode_state(data).online


def test_requests_and_replies_are_tagged_by_op() -> None:
    request = mqtt.decode_request(b'{"op":"events","meter_id":"M1","since_seq":4,"limit":10}')
    assert request == EventsRequest(meter_id="M1", since_seq=4, limit=10)
    reply = mqtt.decode_reply(
        b'{"op":"last_result","meter_id":"M1","result":{"sequence":3,"code":0}}'
    )
    assert isinstance(reply, LastResultReply)
    assert reply.result.to_result() == CommandResult(3, ResultCode.OK)


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[]", "invalid"),
        (TELEMETRY_VECTOR.replace(b'"v":1', b'"v":2'), "invalid"),
        (TELEMETRY_VECTOR.replace(b'"n":5', b'"n":0'), "invalid"),
        (TELEMETRY_VECTOR.replace(b'"control_state":1', b'"control_state":7'), "invalid"),
        (TELEMETRY_VECTOR.replace(b'"energy_import_wh":1234', b'"energy_import_wh":-1'), "invalid"),
        (TELEMETRY_VECTOR.replace(b'"MTR-0001"', b'"MTR/0001"'), "invalid"),
        (TELEMETRY_VECTOR.replace(b'"MTR-0001"', b'"MTR-0001\\n"'), "invalid"),
        (TELEMETRY_VECTOR.replace(b'"power_w":450', b'"power_w":450.5'), "invalid"),
        (b'{"v":1,"x":' + b"[" * 100_000, "not valid JSON"),
    ],
)
def test_bad_telemetry_is_a_decode_error(data: bytes, fragment: str) -> None:
    with pytest.raises(DecodeError, match=fragment):
        mqtt.decode_telemetry(data)


@pytest.mark.parametrize(
    ("payload", "refusal"),
    [
        ({"meter_id": "M1", "sequence": 1, "code": 99}, ResultCode.UNKNOWN_COMMAND),
        ({"meter_id": "M1", "sequence": 1, "code": 3, "args": [1]}, ResultCode.BAD_ARGUMENT),
        ({"meter_id": "M1", "sequence": 1, "code": 6, "args": [7]}, ResultCode.BAD_ARGUMENT),
        ({"meter_id": "M1", "sequence": 1, "code": 1}, None),
    ],
)
def test_a_command_the_meter_cannot_take_has_its_refusal(
    payload: dict[str, Any], refusal: ResultCode | None
) -> None:
    data = json.dumps(payload).encode()
    message = mqtt.decode_command_message(data)
    assert message.refusal() == refusal
    if refusal is not None:
        with pytest.raises(DecodeError):
            mqtt.decode_command(data)


def test_a_tag_must_be_32_lowercase_hex_digits() -> None:
    good = {"meter_id": "M1", "sequence": 1, "code": 1, "tag": "ab" * 16}
    assert mqtt.decode_command(json.dumps(good).encode()).tag == b"\xab" * 16
    for tag in ("AB" * 16, "ab" * 15, "zz" * 16):
        with pytest.raises(DecodeError):
            mqtt.decode_command(json.dumps({**good, "tag": tag}).encode())


# -- round trips ----------------------------------------------------------------------------------

meter_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")
u31 = st.integers(0, 2**31 - 1)
u63 = st.integers(0, 2**63 - 1)
i63 = st.integers(-(2**62), 2**62)

snapshots = st.builds(
    MeterSnapshot,
    meter_id=meter_ids,
    time=u63,
    energy_import_wh=u63,
    energy_rates_wh=st.tuples(u63, u63, u63, u63),
    power_w=i63,
    voltage_dv=i63,
    current_ma=i63,
    power_factor_milli=st.integers(-1000, 1000),
    frequency_chz=u31,
    credit=i63,
    emergency_credit=i63,
    debt=i63,
    credit_unit=st.sampled_from([1, 2]),
    currency=st.sampled_from(["KES", "Wh", "USD"]),
    currency_scale=st.integers(-4, 0),
    low_credit_threshold=i63,
    control_state=st.sampled_from(ControlState),
    control_mode=st.integers(0, 6),
    status=st.integers(0, 511).map(StatusFlag),
    last_event_seq=u63,
    last_transfer=u31,
    last_command_seq=u31,
)


@st.composite
def commands(draw: st.DrawFn) -> Command:
    code = draw(st.sampled_from(CommandCode))
    args = tuple(draw(st.integers(s.minimum, s.maximum)) for s in COMMAND_ARGS[code])
    return Command(code, args)


envelopes = st.builds(
    CommandEnvelope.signed,
    meter_ids,
    st.integers(1, 2**32 - 1),
    commands(),
    st.one_of(st.none(), st.binary(min_size=1, max_size=32)),
)


@given(snapshots, st.integers(1, 2**53 - 1), st.integers(1, 2**53 - 1))
def test_telemetry_round_trip(snapshot: MeterSnapshot, boot: int, n: int) -> None:
    decoded = mqtt.decode_telemetry(mqtt.encode_telemetry(snapshot, boot, n))
    assert decoded.snapshot() == snapshot
    assert decoded.key == (snapshot.meter_id, boot, n)


@given(envelopes)
def test_command_round_trip(envelope: CommandEnvelope) -> None:
    assert mqtt.decode_command(mqtt.encode_command(envelope)) == envelope


@given(
    meter_ids,
    st.builds(
        CommandResult,
        st.integers(0, 2**32 - 1),
        st.sampled_from(ResultCode),
        st.integers(0, 2**32 - 1),
        st.text(max_size=40),
    ),
)
def test_result_round_trip(meter_id: str, result: CommandResult) -> None:
    decoded = mqtt.decode_result(mqtt.encode_result(meter_id, result))
    assert (decoded.meter_id, decoded.result.to_result()) == (meter_id, result)


@given(
    meter_ids,
    st.builds(Event, st.integers(1, 2**63 - 1), u63, st.sampled_from(EventCode), i63, i63),
)
def test_event_round_trip(meter_id: str, event: Event) -> None:
    decoded = mqtt.decode_event(mqtt.encode_event(meter_id, event))
    assert (decoded.meter_id, decoded.event.to_event()) == (meter_id, event)


@given(
    meter_ids,
    st.lists(st.builds(ProfileRow, u63, u63, i63, i63, u31), max_size=5),
    st.booleans(),
)
def test_profile_reply_round_trip(meter_id: str, rows: list[ProfileRow], truncated: bool) -> None:
    reply = ProfileReply(
        meter_id=meter_id,
        rows=[mqtt.ProfileItem.from_row(row) for row in rows],
        truncated=truncated,
    )
    decoded = mqtt.decode_reply(mqtt.encode_reply(reply))
    assert isinstance(decoded, ProfileReply)
    assert [item.to_row() for item in decoded.rows] == rows
    assert decoded.truncated is truncated


@given(snapshots)
def test_snapshot_reply_round_trip(snapshot: MeterSnapshot) -> None:
    reply = SnapshotReply(meter_id=snapshot.meter_id, reading=mqtt.Reading.from_snapshot(snapshot))
    decoded = mqtt.decode_reply(mqtt.encode_reply(reply))
    assert isinstance(decoded, SnapshotReply)
    assert decoded.snapshot() == snapshot


# -- any input: a payload or a DecodeError --------------------------------------------------------

DECODERS = (
    mqtt.decode_telemetry,
    mqtt.decode_event,
    mqtt.decode_state,
    mqtt.decode_command,
    mqtt.decode_command_message,
    mqtt.decode_result,
    mqtt.decode_request,
    mqtt.decode_reply,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "v",
                    "meter_id",
                    "op",
                    "reading",
                    "n",
                    "boot",
                    "code",
                    "args",
                    "tag",
                    "sequence",
                    "event",
                    "result",
                    "seq",
                    "time",
                    "state",
                    "rows",
                    "events",
                    "error",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


def _check_decoders(data: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(DecodeError):
            decode(data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    _check_decoders(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_decodes_or_raises_decode_error(value: Any) -> None:
    _check_decoders(json.dumps(value).encode())


@settings(max_examples=200)
@given(st.binary(max_size=20), st.integers(0, len(TELEMETRY_VECTOR)), st.binary(max_size=5))
def test_damaged_vectors_decode_or_raise_decode_error(
    prefix: bytes, cut: int, splice: bytes
) -> None:
    _check_decoders(prefix + TELEMETRY_VECTOR)
    _check_decoders(TELEMETRY_VECTOR[:cut])
    _check_decoders(TELEMETRY_VECTOR[:cut] + splice + TELEMETRY_VECTOR[cut:])


@settings(max_examples=200)
@given(snapshots, st.integers(1, 2**53 - 1), st.data())
def test_mutated_fields_decode_or_raise_decode_error(
    snapshot: MeterSnapshot, n: int, data: st.DataObject
) -> None:
    document = json.loads(mqtt.encode_telemetry(snapshot, 1, n))
    section = data.draw(st.sampled_from([document, document["reading"]]))
    key = data.draw(st.sampled_from(sorted(section)))
    section[key] = data.draw(json_values)
    _check_decoders(json.dumps(document).encode())


# -- topics ---------------------------------------------------------------------------------------


def test_topic_tree() -> None:
    topics = TopicScheme("utility/site-1")
    assert topics.telemetry("M1") == "utility/site-1/v1/meters/M1/telemetry"
    assert topics.cmd_result("M1") == "utility/site-1/v1/meters/M1/cmd/result"
    assert topics.all_meters(TopicKind.EVENTS) == "utility/site-1/v1/meters/+/events"
    assert topics.shared(TopicKind.STATE, "hes") == "$share/hes/utility/site-1/v1/meters/+/state"
    assert topics.shared(TopicKind.STATE, None) == "utility/site-1/v1/meters/+/state"
    assert topics.deadletter == "utility/site-1/v1/deadletter"
    assert topics.acl_pattern() == "utility/site-1/v1/meters/%u/#"
    for kind in TopicKind:
        assert topics.parse(topics.topic("M-1.a_b", kind)) == ("M-1.a_b", kind)


@pytest.mark.parametrize(
    "topic",
    [
        "phs/v1/meters/M1",
        "phs/v1/meters/M1/",
        "phs/v1/meters/M1/telemetry/x",
        "phs/v1/meters/+/telemetry",
        "phs/v1/meters//telemetry",
        "phs/v2/meters/M1/telemetry",
        "other/v1/meters/M1/telemetry",
        "phs/v1/deadletter",
    ],
)
def test_other_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(DecodeError):
        TopicScheme().parse(topic)


@given(st.text(max_size=60))
def test_parsing_any_topic_is_a_match_or_a_decode_error(topic: str) -> None:
    topics = TopicScheme()
    try:
        meter_id, kind = topics.parse(topic)
    except DecodeError:
        return
    assert topics.topic(meter_id, kind) == topic


@pytest.mark.parametrize("prefix", ["", "a//b", "a/+", "#", "$SYS", "a/ b"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValidationError):
        TopicScheme(prefix)


def test_a_meter_owns_only_its_tree() -> None:
    topics = TopicScheme()
    assert topics.owns("M1", "phs/v1/meters/M1/cmd/result")
    assert topics.owns("M1", "phs/v1/meters/M1/reply")
    assert not topics.owns("M1", "phs/v1/meters/M10/reply")
    assert not topics.owns("M1", "phs/v1/meters/M2/reply")
    assert not topics.owns("M1", "phs/v1/meters/M1/#")


def test_the_configuration_uses_the_one_meter_id_rule() -> None:
    from meter_sim import config

    assert not hasattr(config, "METER_ID"), "the rule lives in protocols.meter_id only"
    (meta,) = config.METER_KEYS["id"].__metadata__
    assert (meta.pattern, meta.max_length) == (mqtt.METER_ID_PATTERN, 64)
    with pytest.raises(ConfigError, match="letters, digits"):
        config.MeterConfig("-starts-with-a-dash")


# -- broker settings and credentials --------------------------------------------------------------


def test_broker_urls() -> None:
    plain = BrokerSettings.parse_url("mqtt://hes:s%40cret@127.0.0.1:1884")
    assert (plain.host, plain.port, plain.username, plain.password) == (
        "127.0.0.1",
        1884,
        "hes",
        "s@cret",
    )
    assert plain.url() == "mqtt://hes:***@127.0.0.1:1884"
    assert BrokerSettings.parse_url(plain.url(with_password=True)) == plain
    tls = BrokerSettings.parse_url("mqtts://localhost?ca=/tmp/ca.pem&keepalive=15")
    assert (tls.port, tls.tls, tls.ca_file, tls.keepalive) == (8883, True, "/tmp/ca.pem", 15)
    for bad in ("http://x", "mqtt://x:99999", "mqtt://x?foo=1", "mqtt://:1883", "mqtt://x?ca=a"):
        with pytest.raises(ConfigError):
            BrokerSettings.parse_url(bad)


def test_meter_passwords() -> None:
    assert mqtt.meter_password("M1", "given", None) == "given"
    derived = mqtt.meter_password("M1", None, "fleet")
    assert len(derived) == 32
    assert derived == mqtt.meter_password("M1", "", "fleet")
    assert derived != mqtt.meter_password("M2", None, "fleet")
    assert derived != mqtt.meter_password("M1", None, "another fleet")


@pytest.mark.parametrize("secret", [None, ""])
def test_no_password_is_derived_without_a_secret(secret: str | None) -> None:
    assert not hasattr(mqtt, "LAB_METER_SECRET")
    with pytest.raises(ConfigError, match="M1 has no mqtt_password and there is no password"):
        mqtt.meter_password("M1", None, secret)
    assert mqtt.meter_password("M1", "given", secret) == "given"


# -- the generated document and the layer rule ----------------------------------------------------


def test_docs_mqtt_md_is_current() -> None:
    path = ROOT / "docs" / "mqtt.md"
    assert path.read_text() == mqtt_docs.render_markdown(), (
        "docs/mqtt.md is stale: run python -m cli.gendocs"
    )


def test_the_document_shows_every_topic_and_a_valid_example_of_every_payload() -> None:
    text = mqtt_docs.render_markdown()
    for spec in mqtt.TOPIC_SPECS:
        assert spec.topic in text
    for name, example in mqtt_docs.EXAMPLES:
        assert json.dumps(json.loads(mqtt.encode(example)), indent=2) in text, name
        assert mqtt.decode(mqtt.encode(example), type(example)) == example, name
