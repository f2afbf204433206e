from __future__ import annotations

import re

from cli import gendocs
from cli.docs import mqtt as mqtt_docs
from cli.docs import registermap as registermap_docs
from cli.docs import shared
from protocols.commands import RESULT_TEXT, TAG_BYTES, CommandCode, ResultCode
from protocols.disconnect import MODE_TEXT, MODES
from protocols.modbus_functions import MODBUS_FUNCTIONS, OTHER_FUNCTION
from protocols.mqtt import TOPIC_SPECS, TopicKind
from protocols.readings import EVENT_DETAILS, RELAY_CAUSE_TEXT, EventCode, RelayCause


def test_generated_documents_are_current() -> None:
    stale = gendocs.stale()
    assert not stale, f"regenerate with `python -m cli.gendocs`: {stale}"


def _section(text: str, title: str) -> str:
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_every_table_behind_the_documents_is_complete() -> None:
    assert set(MODE_TEXT) == set(MODES)
    assert set(RESULT_TEXT) == set(ResultCode)
    assert set(EVENT_DETAILS) == set(EventCode)
    assert set(RELAY_CAUSE_TEXT) == set(RelayCause)


def test_the_register_map_explains_the_disconnect_control_modes() -> None:
    section = _section(registermap_docs.render_markdown(), "## Disconnect control modes")
    for mode, text in MODE_TEXT.items():
        assert f"| {mode} | " in section
        assert text in section
    assert "waiting for the customer's button" in MODE_TEXT[6]
    for letter in "abcdefgh":
        assert f"| {letter} | " in section


def test_the_register_map_errors_explain_result_code_1() -> None:
    errors = _section(registermap_docs.render_markdown(), "## Errors")
    assert "**Result code 1** (`duplicate`)" in errors
    assert "applies it zero times" in errors


def test_both_documents_give_event_details_sequences_and_the_key() -> None:
    for text in (registermap_docs.render_markdown(), mqtt_docs.render_markdown()):
        for code in EventCode:
            meaning, a, b = EVENT_DETAILS[code]
            assert (
                f"| {int(code)} | {code.name.lower()} | {meaning} | {a or '-'} | {b or '-'} |"
                in (text)
            )
        assert "**strictly greater**" in text
        assert "`last_command_seq` is the sequence number of the last command" in text
        assert "do not advance it" in text
        assert "**Where the key comes from.**" in text
        assert "`auth_key`" in text
        assert "`sequence_reset` (45)" in text


def test_commands_results_and_the_tag_are_generated_once_for_both_documents() -> None:
    register_map = registermap_docs.render_markdown()
    mqtt = mqtt_docs.render_markdown()
    shared_lines = [
        *shared.result_codes("## x")[2:],
        *shared.sequence_numbers("## x")[2:],
        *shared.event_codes("## x")[2:],
    ]
    for line in shared_lines:
        if line:
            assert line in register_map, line
            assert line in mqtt, line
    tag_text = shared.tag("## x", "")[2].strip()
    assert tag_text in register_map
    assert tag_text in mqtt
    assert f"truncated to its first {TAG_BYTES} bytes" in tag_text
    for code in CommandCode:
        assert f"| {int(code)} | {code.name.lower()} | " in mqtt
        assert f"| {int(code)} | {code.name.lower()} | " in register_map


def test_the_mqtt_document_stands_alone() -> None:
    text = mqtt_docs.render_markdown()
    assert "PEP 604" not in text
    pointer = r"protocols\.|meter_sim\.|headend\.|:class:|:mod:|:func:|:data:|:meth:|\.py\b"
    assert not re.search(pointer, text)
    for title in ("### Request", "### Reply"):
        body = text[text.index(title) :].split("\n")[2]
        assert "`op`" in body


def test_the_register_map_errors_list_every_function_code_from_its_table() -> None:
    errors = _section(registermap_docs.render_markdown(), "## Errors")
    rows = [line for line in errors.splitlines() if line.startswith("| ")]
    assert rows[0] == "| function | name | answer | exception | explanation |"
    assert len(rows) == 1 + len(MODBUS_FUNCTIONS) + 1
    for function in MODBUS_FUNCTIONS:
        answer = "served" if function.served else "refused"
        exception = "-" if function.exception is None else f"{int(function.exception):02X} ("
        row = f"| `{function.label}` | {function.name} | {answer} | {exception}"
        assert any(line.startswith(row) for line in rows), row
        assert any(function.explanation in line for line in rows)
    assert rows[-1].startswith("| any other | " + OTHER_FUNCTION.name + " | refused | 01 (")
    coils = [line for line in rows if "coil" in line or "discrete" in line]
    assert len(coils) == 4
    assert all("| refused | 01 (illegal function) |" in line for line in coils)
    assert "coils and no discrete inputs: their functions are refused with exception 01" in errors


def test_response_topics_name_their_subtrees() -> None:
    docs = {spec.kind: spec.doc for spec in TOPIC_SPECS}
    assert (
        "`<prefix>/v1/meters/<meter-id>/cmd/result` or `…/cmd/result/<anything>`"
        in (docs[TopicKind.CMD_RESULT])
    )
    assert "`<prefix>/v1/meters/<meter-id>/reply` or `…/reply/<anything>`" in docs[TopicKind.REPLY]
    text = mqtt_docs.render_markdown()
    assert docs[TopicKind.CMD_RESULT] in text
    assert docs[TopicKind.REPLY] in text


def test_the_mqtt_document_opens_with_client_ids_and_the_broker_command() -> None:
    opening = mqtt_docs.render_markdown().split("\n## ", 1)[0]
    assert "the broker binds the two" in opening
    assert "dynamic-security plugin" in opening
    assert "`hes broker config --fleet FLEET --out DIR` writes a complete Mosquitto" in opening
    assert "`hes broker run DIR` runs it" in opening
    assert "`[mqtt] password_secret`" in opening
