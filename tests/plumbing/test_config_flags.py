"""plumbing/config_flags: a config dataclass's fields as command-line flags (name, type, default, help, choices),
and the flags parsed back into the config."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from plumbing.config_flags import add_flags, from_args, setting

pytestmark = pytest.mark.fast


@dataclass(frozen=True)
class Example:
    path: str = setting(help="required: no default")
    weight_decay: float = setting(0.8, "decay (default %(default)g)")
    max_len: int | None = None
    progress: bool = setting(True, "no progress bar")
    fast: bool = False
    corpus: tuple[str, ...] = ("a",)
    kind: str = setting("x", choices=("x", "y"))
    hidden: dict = field(default_factory=dict)


def test_flag_rules():
    parser = argparse.ArgumentParser()
    add_flags(parser, Example, skip=["hidden"], rename={"weight_decay": "--wd"})
    args = parser.parse_args(["--path", "p", "--wd", "0.1", "--max-len", "7", "--no-progress", "--fast",
                              "--corpus", "b", "c", "--kind", "y"])
    assert from_args(Example, args) == Example("p", 0.1, 7, False, True, ("b", "c"), "y")
    assert from_args(Example, parser.parse_args(["--path", "p"])) == Example("p")
    assert "--wd WD" in parser.format_help() and "decay (default 0.8)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --path is required: the field has no default
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "p", "--kind", "z"])
    with pytest.raises(ValueError, match="no field"):
        add_flags(argparse.ArgumentParser(), Example, ["nope"])


def test_help_is_metadata_outside_equality_and_hashing():
    """A frozen config hashes as the tuple of its values, as if its fields carried no help."""
    config = Example("p", hidden=None)
    assert hash(config) == hash(tuple(getattr(config, f.name) for f in dataclasses.fields(config)))
    assert config == Example("p", hidden=None) and config != Example("q", hidden=None)  # control: values tell apart


def test_a_command_may_word_a_fields_help_for_itself():
    parser = argparse.ArgumentParser()
    add_flags(parser, Example, ["path", "weight_decay"], help={"weight_decay": "its own words"})
    helps = {a.dest: a.help for a in parser._actions}
    assert helps == {"help": helps["help"], "path": "required: no default", "weight_decay": "its own words"}
