"""Every stage's command line derived from its config dataclasses (plumbing/config_flags.py; the flag rules
themselves: tests/plumbing/test_config_flags.py): the commands parse to exactly the configs' defaults, keep their flag
spellings, fill every section, and take every flag's help from its field. No engine starts."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from distill.cli import build_parser as distill_parser
from distill.student import DistillConfig
from plumbing.config_flags import add_flags, from_args, setting
from serve.app import DeploymentSettings, EngineSettings, EnsembleConfig, HttpSettings
from serve.cli import API_KEY_ENV, config_from_args
from serve.cli import build_parser as serve_parser
from synthdata.annotate import AnnotateConfig
from synthdata.cli import build_parser as synthdata_parser
from synthdata.job import GenerateConfig
from train.cli import build_parser as train_parser
from train.cli import train_config_from_args
from train.data import DatasetSpec
from train.trainer import TrainConfig

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


def test_synthdata_annotate_defaults_are_the_configs():
    args = synthdata_parser().parse_args(["annotate", "--teacher", "t", "--data-dir", "d", "--context", "8",
                                          "--tokens", "5", "--out", "o"])
    assert from_args(AnnotateConfig, args) == AnnotateConfig(teacher="t", data_dir="d", out="o", context=8, tokens=5)


def test_train_and_distill_defaults_are_the_configs():
    for command in ("member", "members", "search"):
        args = train_parser().parse_args([command, "--data-dir", "d", "--out", "o"])
        assert train_config_from_args(args, args.seed) == TrainConfig(data_dir="d")
    args = train_parser().parse_args(["member", "--data-dir", "d", "--out", "o", "--init-from", "base"])
    assert train_config_from_args(args, 0) == TrainConfig(data_dir="d", init_from="base", preset="", warmup_frac=0.05)
    args = train_parser().parse_args(["data", "--corpus", "c", "--data-dir", "d", "--val-tokens", "7"])
    assert from_args(DatasetSpec, args, corpus=tuple(args.corpus)) == DatasetSpec(corpus=("c",), val_max_tokens=7)
    args = distill_parser().parse_args(["--data-dir", "d", "--out", "o"])
    assert from_args(DistillConfig, args, train=train_config_from_args(args, args.seed)) == DistillConfig(
        train=TrainConfig(data_dir="d"), synthetic_dir=None)
    with pytest.raises(SystemExit):
        distill_parser().parse_args(["--data-dir", "d", "--out", "o", "--recipe", "nope"])  # the field's choices


# Each command and the configs its flags are derived from.
COMMAND_CONFIGS = {
    ("train", "data"): (train_parser, [DatasetSpec]),
    ("train", "member"): (train_parser, [TrainConfig]),
    ("train", "members"): (train_parser, [TrainConfig]),
    ("train", "search"): (train_parser, [TrainConfig]),
    ("distill",): (distill_parser, [TrainConfig, DistillConfig]),
    ("synthdata", "generate"): (synthdata_parser, [GenerateConfig]),
    ("synthdata", "annotate"): (synthdata_parser, [AnnotateConfig]),
    ("serve", "up"): (serve_parser, [EnsembleConfig, EngineSettings, DeploymentSettings, HttpSettings]),
}
# The flags whose help a command words for itself: one setting that means something else there.
WORDED_BY_THE_COMMAND = {
    (("train", "members"), "seed"),  # the first of K seeds
    (("distill",), "seed"),  # also the mixture's seed
    (("serve", "up"), "api_key"),  # --api-key is one of three sources of the key (serve.cli.api_key_from)
}


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def flags_without_their_fields_help(parser: argparse.ArgumentParser, configs: list[type]) -> list[str]:
    """The flags of `parser` that stand for a field of `configs` but do not show that field's help: the field has
    none (then only a help= map could give the flag one), or the command words the flag's help itself."""
    fields = {f.name: f for config in configs for f in dataclasses.fields(config)}
    return [action.dest for action in parser._actions if action.dest in fields
            and (not fields[action.dest].metadata.get("help") or action.help != fields[action.dest].metadata["help"])]


def test_every_config_flag_takes_its_help_from_its_field():
    missing = []
    for command, (build, configs) in COMMAND_CONFIGS.items():
        parser = build() if len(command) == 1 else subcommand(build(), command[1])
        missing += [(command, dest) for dest in flags_without_their_fields_help(parser, configs)]
    assert set(missing) == WORDED_BY_THE_COMMAND


@dataclass(frozen=True)
class Bare:
    documented: int = setting(1, "has help")
    bare: int = 2  # no help on the field


def test_the_help_check_catches_a_field_without_help():
    """Negative control: a field without help gives a flag without help, and a help= map does not make up for it."""
    parser = argparse.ArgumentParser()
    add_flags(parser, Bare)
    assert flags_without_their_fields_help(parser, [Bare]) == ["bare"]
    parser = argparse.ArgumentParser()
    add_flags(parser, Bare, help={"bare": "worded by the command"})
    assert flags_without_their_fields_help(parser, [Bare]) == ["bare"]
