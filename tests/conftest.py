"""Shared fixtures: a small real dataset and a few tiny trained members, built once per test session.

They read the Wikipedia corpus in ../shared/data (CI has it); tests that need them skip with the
reason where it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CHORUS_SHARED_DATA", REPO.parent / "shared" / "data"))
WIKI = SHARED_DATA / "corpus" / "enwiki2015_30k.jsonl.zst"
EVAL_DIR = SHARED_DATA / "eval"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture(scope="session")
def wiki_corpus() -> Path:
    return require(WIKI)


@pytest.fixture(scope="session")
def tiny_dataset(wiki_corpus, tmp_path_factory) -> Path:
    """~2M characters of Wikipedia: a 2048-token BPE and ~450k training tokens."""
    from train.data import DatasetSpec, prepare_dataset

    out = tmp_path_factory.mktemp("tiny_dataset")
    prepare_dataset(DatasetSpec(corpus=(str(wiki_corpus),), vocab_size=2048, max_chars=2_000_000,
                                val_max_tokens=20_000), out)
    return out


@pytest.fixture(scope="session")
def tiny_members(tiny_dataset, tmp_path_factory) -> list[Path]:
    """Three cpu-xs members (seeds 0, 1, 2) on 40k tokens x 2 epochs: model directories."""
    from train.trainer import TrainConfig, train_member

    root = tmp_path_factory.mktemp("tiny_members")
    dirs = []
    for seed in range(3):
        cfg = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xs", tokens=40_000, epochs=2, lr=3e-3,
                          weight_decay=0.4, seed=seed, batch_size=16, context=128)
        dirs.append(Path(train_member(cfg, root / f"seed-{seed}", progress=False)["model_dir"]))
    return dirs
