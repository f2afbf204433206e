from __future__ import annotations

from cli import gendocs


def test_generated_documents_are_current() -> None:
    stale = gendocs.stale()
    assert not stale, f"regenerate with `python -m cli.gendocs`: {stale}"
