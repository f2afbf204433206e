"""`hes token …`: reproducible tokens on stdout, every field with --json, one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.hes import app

runner = CliRunner()
KEY_A = ["--vending-key", "abababababababab", "--pan", "600727000000000009", "--base-date", "1993"]


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["token", *args])
    return result.exit_code, result.stdout, result.stderr


def test_credit_prints_the_reference_token() -> None:
    code, out, err = run(
        "credit", "--amount", "0.1", *KEY_A, "--issued-at", "2004-03-01T13:55:00Z", "--random", "5"
    )
    assert code == 0, err
    assert out == "23716100501183194197\n"
    assert err == "TID 5871715\n"  # the vendor records it and passes it back as --last-tid


def test_every_key_input_can_be_given() -> None:
    code, out, _ = run(
        "credit",
        "--amount",
        "0.1",
        "--vending-key",
        "abababababababab",
        "--pan",
        "0100000000008",  # a 13-digit DRN: PAN 000001000000000082
        "--sgc",
        "123456",
        "--ti",
        "1",
        "--krn",
        "1",
        "--kt",
        "2",
        "--base-date",
        "1993",
        "--issued-at",
        "2004-03-01T14:00",  # no zone: UTC
        "--random",
        "5",
    )
    assert code == 0
    assert out.strip() == "67206107716095682372"


def test_credit_json_has_every_field_and_the_rounded_amount() -> None:
    code, out, _ = run(
        "credit",
        "--amount",
        "2000.05",
        *KEY_A,
        "--issued-at",
        "2004-03-01T13:55Z",
        "--random",
        "5",
        "--json",
    )
    assert code == 0
    fields = json.loads(out)
    assert fields["kind"] == "credit-electricity"
    assert fields["tid"] == 5871715
    assert fields["rnd"] == 5
    assert fields["issued_at"] == "2004-03-01T13:55:00Z"
    assert fields["requested_wh"] == 2_000_050
    assert fields["wh"] == 2_000_400
    assert fields["kwh"] == "2000.400"
    assert len(fields["token"]) == 20


def test_a_rounded_amount_is_reported_on_stderr() -> None:
    code, out, err = run("credit", "--amount", "12.34", *KEY_A, "--issued-at", "2004-03-01T13:55Z")
    assert code == 0
    assert len(out.strip()) == 20
    assert "12.340 kWh" in err
    assert "12.400 kWh" in err


@pytest.mark.parametrize(
    ("command", "extra", "issued", "expected"),
    [
        ("power-limit", ["--value", "1000"], "2004-03-28T09:01Z", "50901894209860263092"),
        ("clear-credit", [], "2004-03-28T09:15Z", "29511990995826640868"),
        ("clear-credit", ["--value", "65535"], "2004-03-28T09:15Z", "29511990995826640868"),
        ("clear-tamper", [], "2004-03-28T10:00Z", "37037300014464855694"),
        ("phase-unbalance-limit", ["--value", "10"], "2004-03-28T10:20Z", "30220533115430798647"),
    ],
)
def test_management_tokens(command: str, extra: list[str], issued: str, expected: str) -> None:
    code, out, err = run(command, *extra, *KEY_A, "--issued-at", issued, "--random", "5")
    assert code == 0, err
    assert out.strip() == expected


@pytest.mark.parametrize(
    ("args", "expected", "subclass"),
    [
        (["--control", str((1 << 36) - 1)], "56493153725450313471", 0),
        (["--control", "0xFFFFFFF", "--four-digit-manufacturer"], "02305843005052951967", 1),
    ],
)
def test_test_tokens_need_no_key(args: list[str], expected: str, subclass: int) -> None:
    code, out, err = run("test", *args)
    assert (code, out, err) == (0, f"{expected}\n", "")  # no TID: a test token carries none
    code, out, _ = run("test", *args, "--json")
    assert code == 0
    fields = json.loads(out)
    assert (fields["kind"], fields["class"], fields["subclass"]) == ("test", 1, subclass)
    assert fields["manufacturer"] == 0
    assert "tid" not in fields


def test_key_change_prints_both_tokens() -> None:
    code, out, _ = run("key-change", *KEY_A, "--new-ti", "2")
    assert code == 0
    assert out.split() == ["51638423060042734509", "15361891762113502242"]
    code, out, _ = run("key-change", *KEY_A, "--new-krn", "2", "--new-base-date", "2014", "--json")
    assert code == 0
    first, second = json.loads(out)["tokens"]
    assert first["kind"] == "key-change-1"
    assert first["rollover"] is True
    assert first["krn"] == 2
    assert second["kind"] == "key-change-2"
    assert second["ti"] == 1


def test_decode_shows_every_field() -> None:
    code, out, _ = run("decode", "2371 6100 5011 8319 4197", *KEY_A, "--json")
    assert code == 0
    fields = json.loads(out)
    assert fields["wh"] == 100
    assert fields["tid"] == 5871715
    assert fields["issued_at"] == "2004-03-01T13:55:00Z"
    code, out, _ = run("decode", "23716100501183194197", *KEY_A)
    assert code == 0
    assert "credit-electricity" in out
    assert "5871715" in out


def test_decode_round_trips_what_credit_issued() -> None:
    _, token, _ = run("credit", "--amount", "7.5", *KEY_A, "--issued-at", "2010-01-01T00:00Z")
    code, out, _ = run("decode", token.strip(), *KEY_A, "--json")
    assert code == 0
    assert json.loads(out)["wh"] == 7500


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["decode", "23716100501183194198", *KEY_A], "crc"),
        (["decode", "1234", *KEY_A], "format"),
        (
            ["credit", "--amount", "1", "--vending-key", "abcd", "--pan", "00000000000"],
            "vending key",
        ),
        (
            [
                "credit",
                "--amount",
                "1",
                "--vending-key",
                "abababababababab",
                "--pan",
                "00000000001",
            ],
            "meter number",
        ),
        (["credit", "--amount", "-1", *KEY_A], "kWh"),
        (["credit", "--amount", "1", *KEY_A, "--issued-at", "yesterday"], "ISO-8601"),
        (["credit", "--amount", "1", *KEY_A, "--issued-at", "2030-01-01T00:00Z"], "base date 1993"),
        (
            ["credit", "--amount", "1", *KEY_A, "--random", "16", "--issued-at", "2004-01-01"],
            "random",
        ),
        (["credit", "--amount", "1", *KEY_A[:2], "--pan", "600727000000000008"], "not a PAN"),
        (["clear-credit", *KEY_A, "--value", "all"], "register mask"),
        (["key-change", *KEY_A, "--new-base-date", "2035"], "rollover"),
        (["test", "--control", "lamp"], "bit field"),
        (["test", "--control", str(1 << 36)], "control is an integer 0..68719476735"),
        (["test", "--control", str(1 << 28), "--four-digit-manufacturer"], "0..268435455"),
        (["test", "--control", "1", "--manufacturer", "256"], "manufacturer is an integer 0..255"),
    ],
)
def test_errors_are_one_line_on_stderr_and_exit_1(args: list[str], message: str) -> None:
    code, out, err = run(*args)
    assert code == 1
    assert out == ""
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1


def test_help_documents_the_rounding() -> None:
    result = runner.invoke(app, ["token", "credit", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "rounded UP to the next step" in text


def test_last_tid_gives_the_next_token_a_later_tid() -> None:
    args = [
        "--vending-key",
        "abababababababab",
        "--pan",
        "47123456783",
        "--issued-at",
        "2026-03-01T12:00Z",
        "--json",
    ]
    first = json.loads(CliRunner().invoke(app, ["token", "credit", "--amount", "1", *args]).stdout)
    second_run = CliRunner().invoke(
        app, ["token", "credit", "--amount", "1", "--last-tid", str(first["tid"]), *args]
    )
    assert second_run.exit_code == 0, second_run.output
    second = json.loads(second_run.stdout)
    assert second["tid"] == first["tid"] + 1
    same = json.loads(CliRunner().invoke(app, ["token", "clear-tamper", *args]).stdout)
    assert same["tid"] == first["tid"], "without --last-tid the issue minute decides"
