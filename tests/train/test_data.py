"""Corpus reading, tokenizer, token shards, budgets and windows, and the generated corpus the fixtures use: no
shared data needed."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import zstandard

from train.corpus import CorpusError, read_documents
from train.data import (IGNORE_INDEX, DataError, DatasetSpec, load_tokenizer, load_tokens, prepare_dataset,
                        read_manifest, windows)

WORDS = ("the river flows past an old mill where the miller grinds wheat into flour for the village bakers "
         "who rise before dawn to light their ovens and shape the loaves that feed the town").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(40, 200)))) + f" doc{i}." for i in range(n)]


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    docs = make_docs(60)
    for i, doc in enumerate(docs[:20]):
        (d / f"doc{i}.txt").write_text(doc)
    with open(d / "more.jsonl", "w") as f:
        for doc in docs[20:40]:
            f.write(json.dumps({"id": 1, "text": doc}) + "\n")
    with open(d / "more.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in docs[40:]).encode()))
    return d


def test_reads_every_format(corpus_dir):
    docs = list(read_documents([corpus_dir]))
    assert len(docs) == 60
    assert set(docs) == set(make_docs(60))


def test_dataset_split_budget_and_reuse(corpus_dir, tmp_path):
    spec = DatasetSpec(corpus=(str(corpus_dir),), vocab_size=300, val_fraction=0.2)
    out = tmp_path / "ds"
    manifest = prepare_dataset(spec, out)
    train_hashes = set()
    val_hashes = set()
    import pyarrow.parquet as pq
    for split, hashes in (("train", train_hashes), ("val", val_hashes)):
        for shard in manifest["splits"][split]["shards"]:
            hashes.update(pq.read_table(out / shard["file"]).column("doc_hash").to_pylist())
    assert train_hashes and val_hashes and not train_hashes & val_hashes  # disjoint, both present

    tok = load_tokenizer(out / "tokenizer")
    assert tok("hello").input_ids[0] == tok.bos_token_id  # the post-processor prepends BOS
    stream = load_tokens(out, "train")
    assert stream[0] == manifest["bos_token_id"] and (stream == manifest["eos_token_id"]).sum() == len(train_hashes)
    assert len(load_tokens(out, "train", 1234)) == 1234  # a budget is exact
    np.testing.assert_array_equal(load_tokens(out, "train", 500), stream[:500])  # and a prefix: budgets nest
    with pytest.raises(DataError, match="exceeds"):
        load_tokens(out, "train", manifest["splits"]["train"]["tokens"] + 1)

    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_dataset(spec, out) == manifest  # same inputs: reused, not rebuilt
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="other inputs"):
        prepare_dataset(DatasetSpec(corpus=(str(corpus_dir),), vocab_size=400, val_fraction=0.2), out)


def test_dataset_identity_is_the_corpus_content_not_its_mtime(corpus_dir, tmp_path):
    import os

    from plumbing.artifacts import atomic_write_json

    spec = DatasetSpec(corpus=(str(corpus_dir),), vocab_size=300, val_fraction=0.2)
    out = tmp_path / "ds"
    manifest = prepare_dataset(spec, out)
    doc = corpus_dir / "doc0.txt"
    os.utime(doc, ns=(1, 1))  # copied or unpacked again: new mtime, same bytes
    assert prepare_dataset(spec, out) == manifest
    # a manifest from before content keys recorded (path, size, mtime_ns): same paths and sizes are re-keyed
    legacy = json.loads(json.dumps(manifest))
    legacy["inputs"]["files"] = [[path, size, 123] for path, size, _ in legacy["inputs"]["files"]]
    atomic_write_json(out / "manifest.json", legacy)
    assert prepare_dataset(spec, out)["inputs"] == manifest["inputs"]
    assert read_manifest(out)["inputs"] == manifest["inputs"]
    # control: the same size but other bytes is another corpus
    doc.write_text(doc.read_text().replace("the", "eth", 1))
    with pytest.raises(DataError, match="other inputs"):
        prepare_dataset(spec, out)


def test_validation_set_is_fixed_by_content(corpus_dir, tmp_path):
    """Same documents in another file order give the same validation tokens."""
    a = prepare_dataset(DatasetSpec(corpus=(str(corpus_dir),), vocab_size=300), tmp_path / "a")
    other = tmp_path / "shuffled"
    other.mkdir()
    for i, doc in enumerate(reversed(make_docs(60))):
        (other / f"x{i}.txt").write_text(doc)
    b = prepare_dataset(DatasetSpec(corpus=(str(other),), vocab_size=300), tmp_path / "b")
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]
    np.testing.assert_array_equal(load_tokens(tmp_path / "a", "val"), load_tokens(tmp_path / "b", "val"))


def test_corrupt_shard_is_named(corpus_dir, tmp_path):
    out = tmp_path / "ds"
    manifest = prepare_dataset(DatasetSpec(corpus=(str(corpus_dir),), vocab_size=300), out)
    shard = out / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=shard.name):
        load_tokens(out, "train")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        read_manifest(out)
    (out / "manifest.json").write_text("[1, 2]")  # valid JSON, not a manifest: named, not a TypeError
    with pytest.raises(DataError, match="is not a Chorus token manifest"):
        read_manifest(out)


def test_bad_corpora(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(read_documents([tmp_path / "nope"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        list(read_documents([empty]))
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        prepare_dataset(DatasetSpec(corpus=(str(blank),)), tmp_path / "ds")
    assert not (tmp_path / "ds" / "manifest.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2"):
        list(read_documents([bad]))
    with pytest.raises(CorpusError, match="unsupported"):
        (tmp_path / "x.bin").write_bytes(b"\0")
        list(read_documents([tmp_path / "x.bin"]))


def test_windows_cover_every_target_once():
    stream = np.arange(1, 1001, dtype=np.int32)
    inputs, targets = windows(stream, 64)
    assert inputs.shape == targets.shape == (16, 64)
    valid = targets[targets != IGNORE_INDEX]
    np.testing.assert_array_equal(valid, stream[1:])  # every token but the first is a target, once, in order
    np.testing.assert_array_equal(inputs[0, 1:], targets[0, :-1])


def test_dataset_with_an_existing_models_tokenizer(corpus_dir, tmp_path):
    """`train data --tokenizer DIR` (continued pre-training): the base's tokenizer is used as is, its hash recorded."""
    from plumbing.artifacts import sha256_file

    base = prepare_dataset(DatasetSpec(corpus=(str(corpus_dir),), vocab_size=300), tmp_path / "base")
    base_tok = tmp_path / "base" / "tokenizer"
    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + the miller"}) + "\n"
                              for i in range(40)))
    spec = DatasetSpec(corpus=(str(domain),), vocab_size=999, tokenizer=str(base_tok))
    manifest = prepare_dataset(spec, tmp_path / "cpt")
    assert manifest["tokenizer_sha256"] == base["tokenizer_sha256"] == sha256_file(base_tok / "tokenizer.json")
    assert manifest["vocab_size"] == base["vocab_size"]  # the base's vocabulary, not --vocab-size
    tok = load_tokenizer(tmp_path / "cpt" / "tokenizer")
    stream = load_tokens(tmp_path / "cpt", "train")
    first_doc = stream[: int(np.argmax(stream == manifest["eos_token_id"])) + 1]
    assert first_doc[0] == manifest["bos_token_id"] and first_doc[-1] == manifest["eos_token_id"]
    assert "return x *" in tok.decode(first_doc[1:-1])
    assert prepare_dataset(spec, tmp_path / "cpt") == manifest  # reused on re-run
    # negative control: a dataset that trains its own tokenizer on the domain has another hash
    own = prepare_dataset(DatasetSpec(corpus=(str(domain),), vocab_size=300), tmp_path / "own")
    assert own["tokenizer_sha256"] != base["tokenizer_sha256"]


def test_bad_tokenizer_directories_are_named(corpus_dir, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(DataError, match=f"--tokenizer {empty}: no tokenizer.json"):
        prepare_dataset(DatasetSpec(corpus=(str(corpus_dir),), tokenizer=str(empty)), tmp_path / "a")
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=f"--tokenizer {garbled}: cannot be loaded"):
        prepare_dataset(DatasetSpec(corpus=(str(corpus_dir),), tokenizer=str(garbled)), tmp_path / "b")


# ---- the generated corpus (train/synthetic_text.py): what the core fixtures are made of --------------------

def test_generated_text_is_the_same_on_every_machine():
    from train.synthetic_text import documents

    text = "\n".join(documents(200_000, seed=0))
    # pinned: a change to the generator (or to Python's random) changes every fixture, and must say so here
    assert hashlib.sha256(text.encode()).hexdigest() == "efa22ae9b249d64e58fcc5982fe9f9d2310d1eefa92adb1b1b32f4f2f314303b"
    assert "\n".join(documents(200_000, seed=0)) == text
    assert "\n".join(documents(200_000, seed=1)) != text  # control: the seed matters


def test_fixture_dataset_is_sized_and_learnable(tiny_dataset):
    """The generated corpus gives the sizes the fixtures were made for (a 2048-token BPE, ~450k training tokens,
    20k validation tokens) and structure a model can learn: a bigram model fitted on the training tokens predicts
    the validation tokens more than 1 nat/token better than a unigram model (measured: 6.21 vs 4.46)."""
    manifest = read_manifest(tiny_dataset)
    assert manifest["vocab_size"] == 2048
    assert 400_000 <= manifest["splits"]["train"]["tokens"] <= 600_000
    assert manifest["splits"]["val"]["tokens"] == 20_000
    train, val = load_tokens(tiny_dataset, "train"), load_tokens(tiny_dataset, "val")
    unigram = np.bincount(train, minlength=2048) + 0.1
    unigram /= unigram.sum()
    bigram = np.zeros((2048, 2048))
    np.add.at(bigram, (train[:-1], train[1:]), 1.0)
    bigram = (bigram + unigram[None, :]) / (bigram.sum(1, keepdims=True) + 1.0)  # smoothed toward the unigram
    unigram_nats = -np.log(unigram[val]).mean()
    bigram_nats = -np.log(bigram[val[:-1], val[1:]]).mean()
    assert unigram_nats - bigram_nats > 1.0, (unigram_nats, bigram_nats)
