"""Command lines derived from the config dataclasses (plumbing/config_flags.py): `serve up` and `synthdata generate`
parse to exactly the configs' defaults, keep their flag spellings, and fill every section. No engine starts."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from plumbing.config_flags import add_flags, from_args, setting
from serve.app import DeploymentSettings, EngineSettings, EnsembleConfig, HttpSettings
from serve.cli import API_KEY_ENV, config_from_args
from serve.cli import build_parser as serve_parser
from synthdata.cli import build_parser as synthdata_parser
from synthdata.job import GenerateConfig

pytestmark = pytest.mark.fast


def up_config(*argv: str) -> EnsembleConfig:
    return config_from_args(serve_parser().parse_args(["up", "--model", "m", *argv]))


def test_serve_up_defaults_are_the_configs(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert up_config() == EnsembleConfig(model_dir="m")


def test_serve_up_flags_reach_their_sections(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    config = up_config("--name", "n", "--replicas", "3", "--port", "9", "--kv-cache-gib", "0.25", "--compile",
                       "--draft-sampling", "probabilistic", "--max-n", "2", "--request-timeout-s", "1.5",
                       "--max-queued-requests", "5", "--allow-unauthenticated")
    assert config.served_model_name == "n"
    assert config.engine == EngineSettings(kv_cache_gib=0.25, compile=True, draft_sampling="probabilistic")
    assert config.deployment == DeploymentSettings(replicas=3, max_queued_requests=5)
    assert config.http == HttpSettings(port=9, max_n=2, request_timeout_s=1.5, allow_unauthenticated=True,
                                       api_key="from-env")
    assert "--kv-cache-memory-bytes" in (argv := config.vllm_cli_args()) and str(256 << 20) in argv
    assert "--enforce-eager" not in argv and "--enforce-eager" in EnsembleConfig(model_dir="m").vllm_cli_args()


def test_api_key_stays_out_of_the_config_repr():
    assert "secret-key" not in repr(EnsembleConfig(model_dir="m", http=HttpSettings(api_key="secret-key")))


def test_synthdata_generate_defaults_are_the_configs():
    args = synthdata_parser().parse_args(["generate", "--teacher", "t", "--tokens", "5", "--out", "o"])
    assert from_args(GenerateConfig, args) == GenerateConfig(teacher="t", tokens=5, out="o")
    args = synthdata_parser().parse_args(["generate", "--teacher", "t", "--tokens", "5", "--out", "o", "--no-progress"])
    assert from_args(GenerateConfig, args).progress is False


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
