"""The README's reference sections are generated from the code: this fails when they drift apart."""

from __future__ import annotations

from pathlib import Path

from stream_adapt.config import reference_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_is_the_generated_reference() -> None:
    # Regenerate with: stream-adapt config reference
    assert reference_table() in README.read_text()


def test_readme_names_every_cli_command() -> None:
    from stream_adapt.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # argparse keeps them here
    text = README.read_text()
    missing = [c for c in commands if f"stream-adapt {c}" not in text]
    assert not missing, f"README does not show: {missing}"
