"""Sections that docs/register-map.md and docs/mqtt.md share, generated once from the code's
tables (commands, result codes, the tag, sequence numbers, events, disconnect control modes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from protocols.commands import (
    COMMAND_ARGS,
    RESULT_TEXT,
    TAG_BYTES,
    U32_MAX,
    ArgSpec,
    CommandCode,
    ResultCode,
)
from protocols.disconnect import MODE_TEXT, MODES, TRANSITIONS, ControlState, Trigger
from protocols.readings import EVENT_DETAILS, RELAY_CAUSE_TEXT, EventCode

#: where an argument goes: (command, index of the argument, its spec) -> text
ArgPlace = Callable[[CommandCode, int, ArgSpec], str]


def md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return out


def commands(title: str, place: ArgPlace) -> list[str]:
    """The command table; ``place`` says where each argument travels in this transport."""
    lines = []
    for code in CommandCode:
        specs = COMMAND_ARGS[code]
        where = (
            ", ".join(
                f"{place(code, index, spec)} = {spec.name} ({spec.minimum}..{spec.maximum}): "
                f"{spec.doc}"
                for index, spec in enumerate(specs)
            )
            or "none"
        )
        lines.append([str(int(code)), code.name.lower(), where])
    return [title, "", *md_table(["code", "command", "arguments"], lines), ""]


def result_codes(title: str) -> list[str]:
    lines = [[str(int(code)), code.name.lower(), RESULT_TEXT[code]] for code in ResultCode]
    return [
        title,
        "",
        *md_table(["code", "name", "meaning"], lines),
        "",
        "Codes 0 and 1 mean the command is in effect. A meter answers every command it can read "
        "with one of these codes and logs the refusals as events.",
        "",
    ]


def tag(title: str, no_key: str) -> list[str]:
    """The authentication tag; ``no_key`` says how this transport carries "no tag"."""
    return [
        title,
        "",
        "The tag is HMAC-SHA256 with the meter's key over: the meter id (UTF-8), one NUL byte, "
        "the sequence number (4 bytes, big-endian), the command code (2 bytes, big-endian) and "
        "each argument the command takes (16 bytes each, big-endian), truncated to its first "
        f"{TAG_BYTES} bytes. {no_key}",
        "",
        "**Where the key comes from.** A meter's key is the `auth_key` of its entry (or of "
        "`[defaults]`) in the fleet file, as hex; the meter never reveals it (no register, "
        "topic or event carries it). The head-end holds the same key in its registry "
        "(`hes meters import --from-fleet` takes it from the fleet file, a meters.csv from its "
        "`auth_key` column), and its command store signs every envelope with it; the lab "
        "commands that bypass the head-end take it as `hes direct credit ... --key HEX`. A "
        "meter without `auth_key` accepts commands without a tag, which is for lab use only.",
        "",
    ]


def sequence_numbers(title: str) -> list[str]:
    return [
        title,
        "",
        "Every command carries a sequence number 1.."
        f"{U32_MAX}. A meter executes a command only when its sequence number is **strictly "
        "greater** than the last one it executed (the rule of DLMS invocation counters); any "
        "jump forward is accepted, so numbers a head-end used for commands that never arrived "
        "are simply skipped.",
        "",
        "* The same sequence number with the same content again (a retry after a lost answer) "
        "is answered with the stored result and executed zero times.",
        "* A lower sequence number, or the same one with other content, is refused as "
        "`replayed` (8).",
        "* `last_command_seq` is the sequence number of the last command the meter executed: "
        "applied, or refused by its state, an argument or the transfer number (such a "
        "command has used its number up; a retry gets the same refusal). Commands refused "
        "for their tag (`auth_failed`), as replays, or for another meter's id do not advance "
        "it, so that nobody without the key can use up a meter's sequence numbers.",
        "* The sequence belongs to the key. When a meter starts with another `auth_key` (or "
        "its first one), the sequence starts again from 0 and the event `sequence_reset` "
        "(45) is logged. That is the way out of the top of the range, for a keyed meter as "
        "for a keyless one: install a new key. A stranger cannot use it: changing the key "
        "needs the meter's configuration, and commands recorded under the old key fail the "
        "new key's tag check, so no old command can be replayed after the restart.",
        "",
    ]


def event_codes(title: str) -> list[str]:
    lines = []
    for code in EventCode:
        meaning, a, b = EVENT_DETAILS[code]
        lines.append([str(int(code)), code.name.lower(), meaning, a or "-", b or "-"])
    causes = [
        [str(int(cause)), cause.name.lower(), text] for cause, text in RELAY_CAUSE_TEXT.items()
    ]
    return [
        title,
        "",
        "Each event has a lifelong sequence number, the meter's time, a code and two detail "
        "values `a` and `b` whose meaning depends on the code:",
        "",
        *md_table(["code", "name", "what happened", "a", "b"], lines),
        "",
        "Relay causes (detail `a` of events 10, 11 and 12):",
        "",
        *md_table(["cause", "name", "meaning"], causes),
        "",
    ]


_TRIGGER_TEXT = {
    Trigger.REMOTE_DISCONNECT: "remote disconnect (command 1)",
    Trigger.REMOTE_RECONNECT: "remote reconnect (command 2)",
    Trigger.MANUAL_DISCONNECT: "manual disconnect (the customer's button)",
    Trigger.MANUAL_RECONNECT: "manual reconnect (the customer's button)",
    Trigger.LOCAL_DISCONNECT: "local disconnect (credit ran out, load limiter)",
    Trigger.LOCAL_RECONNECT: "local reconnect (credit restored, limiter timer)",
}


def _state(state: ControlState) -> str:
    return f"{int(state)} {state.name.lower()}"


def control_modes() -> list[str]:
    """``## Disconnect control modes``: the states, transitions a-h and modes 0-6."""
    transitions = [
        [letter, _TRIGGER_TEXT[trigger], _state(source), _state(target)]
        for letter, (trigger, source, target) in TRANSITIONS.items()
    ]
    modes = []
    for mode, allowed in MODES.items():
        cells = [str(mode)]
        for trigger in Trigger:
            letters = sorted(
                letter
                for letter, (trig, _, _) in TRANSITIONS.items()
                if trig is trigger and letter in allowed
            )
            cells.append(", ".join(letters) or "-")
        cells.append(MODE_TEXT[mode])
        modes.append(cells)
    header = ["mode", *(trigger.value.replace("_", " ") for trigger in Trigger), "in words"]
    return [
        "## Disconnect control modes",
        "",
        "The relay (DLMS disconnect control) is in one of three states: "
        + ", ".join(_state(state) for state in ControlState)
        + ". The relay output is on only when connected; ready for reconnection means open and "
        "waiting for the customer's button.",
        "",
        *md_table(["transition", "trigger", "from", "to"], transitions),
        "",
        "The control mode (`control_mode`, set with command 6) says which transitions the "
        "meter allows. A trigger the mode does not allow is refused (`refused_by_mode`, 2); one "
        "it allows but not from the current state is refused as `refused_by_state` (3); the "
        "relay stays as it is.",
        "",
        *md_table(header, modes),
        "",
    ]
