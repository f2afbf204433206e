"""What a run leaves behind for a CI: JUnit XML (one test case per expectation) and the capture
of every frame on the line, as CSV or as pcap (docs/hil.md describes both).

CSV columns: ``time`` (UTC, ISO-8601 with microseconds), ``elapsed_s`` (seconds after the
start), ``sender`` (``master`` or ``meter``), ``unit`` and ``function`` (of the frame's first
two bytes), ``crc_ok`` (1 when the frame's last two bytes are its CRC), ``fault`` (the fault
that shaped a meter's answer, empty otherwise), ``hex`` (the bytes). Bytes from the master are
one row per frame (a row ends at 3.5 characters of silence); a meter's answer is one row per
piece it was sent in (an answer with a gap is two rows).

pcap: link type 147 (``DLT_USER0``, which Wireshark decodes as Modbus RTU once told to in its
DLT_User table: ``mbrtu``), one packet per CSV row, with the row's time.
"""

from __future__ import annotations

import csv
import struct
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from meter_sim.rig.expect import Verdict
from meter_sim.rig.faults import crc_ok
from meter_sim.rig.runner import Record
from protocols.errors import ConfigError

CSV_COLUMNS = ("time", "elapsed_s", "sender", "unit", "function", "crc_ok", "fault", "hex")
PCAP_LINKTYPE = 147  # DLT_USER0
_PCAP_MAGIC = 0xA1B2C3D4


def _write(path: Path, data: bytes | str) -> None:
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from exc


def junit_xml(record: Record, verdicts: list[Verdict]) -> str:
    """JUnit XML: one testsuite (the scenario), one testcase per expectation."""
    failures = sum(not v.passed for v in verdicts)
    name = record.scenario.name
    suites = ET.Element(
        "testsuites", name="meter-sim rig", tests=str(len(verdicts)), failures=str(failures)
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=name,
        tests=str(len(verdicts)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{record.elapsed:.3f}",
        timestamp=datetime.fromtimestamp(record.started, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    )
    for verdict in verdicts:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{name}.{verdict.kind}",
            name=verdict.name,
            time=f"{record.elapsed:.3f}",
        )
        if verdict.passed:
            ET.SubElement(case, "system-out").text = verdict.message
        else:
            failure = ET.SubElement(case, "failure", message=verdict.message, type=verdict.kind)
            failure.text = verdict.message
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, "unicode") + "\n"


def write_junit(path: Path, record: Record, verdicts: list[Verdict]) -> None:
    _write(path, junit_xml(record, verdicts))


def capture_rows(record: Record) -> list[list[str]]:
    rows = []
    for row in record.line.capture:
        data = bytes(row.data)
        when = datetime.fromtimestamp(record.started + row.at, UTC)
        rows.append(
            [
                when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
                f"{row.at:.6f}",
                row.sender,
                str(data[0]) if data else "",
                str(data[1]) if len(data) > 1 else "",
                "1" if crc_ok(data) else "0",
                row.fault,
                data.hex(),
            ]
        )
    return rows


def write_capture(path: Path, record: Record) -> None:
    """The capture as pcap when ``path`` ends in .pcap, as CSV otherwise."""
    if path.suffix.lower() == ".pcap":
        _write(path, pcap_bytes(record))
        return
    try:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(capture_rows(record))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from exc


def pcap_bytes(record: Record) -> bytes:
    out = [struct.pack("<IHHiIII", _PCAP_MAGIC, 2, 4, 0, 0, 65535, PCAP_LINKTYPE)]
    for row in record.line.capture:
        data = bytes(row.data)
        when = record.started + row.at
        seconds = int(when)
        micros = round((when - seconds) * 1_000_000)
        if micros == 1_000_000:
            seconds, micros = seconds + 1, 0
        out.append(struct.pack("<IIII", seconds, micros, len(data), len(data)) + data)
    return b"".join(out)
