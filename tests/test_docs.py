"""The README documents what the code offers: every setting and every command."""

from __future__ import annotations

from pathlib import Path

from tutor_scoring_dagster.cli import COMMANDS
from tutor_scoring_dagster.config import SETTINGS, settings_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [s.env for s in SETTINGS if f"| `{s.env}` |" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_the_configuration_table_is_the_generated_one() -> None:
    """Regenerate with: .venv/bin/python -c 'from tutor_scoring_dagster.config import
    settings_table; print(settings_table())'."""
    assert settings_table() in README


def test_every_command_is_documented() -> None:
    missing = [name for name in COMMANDS if f"| `{name}" not in README]
    assert not missing, f"README's command table lacks {missing}"


def test_the_two_commands_open_the_readme() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "./dev demo" in quickstart and "./dev test" in quickstart
