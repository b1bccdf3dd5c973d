"""The regime of issue 24: budgets are nested prefixes of a chunk-shuffled stream (deterministic, across many
documents), validation one chunk per held-out document, whole-document datasets unchanged; the new profiles load
and carry the issue's design; the gate passes on results with the effects and fails without; the report says so."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bench.study.analysis import write_report
from bench.study.job import Study, StudyConfig
from bench.study.profile import StudyError, load_profile, validate_profile
from bench.study.training import gate_verdict
from train.data import DatasetSpec, _inputs_key, load_tokens, one_chunk_each, prepare_dataset, shuffled_chunks


def docs(n=40, length=100):
    return [[1000 * d + i for i in range(length + d)] for d in range(n)], [f"h{d}" for d in range(n)]


@pytest.mark.fast
def test_shuffled_chunks_keep_every_token_are_seeded_and_spread_over_documents():
    ids, hashes = docs()
    chunks, owners = shuffled_chunks(ids, hashes, 16, seed=0)
    assert sorted(t for c in chunks for t in c) == sorted(t for d in ids for t in d)
    assert all(len(c) <= 16 for c in chunks) and len(owners) == len(chunks)
    assert all(c[0] // 1000 == int(h[1:]) for c, h in zip(chunks, owners))  # each chunk keeps its document's hash
    assert (chunks, owners) == shuffled_chunks(ids, hashes, 16, seed=0)
    assert chunks != shuffled_chunks(ids, hashes, 16, seed=1)[0]
    assert len(set(owners[:20])) >= 10  # a small budget (20 chunks) spans many documents, not one or two
    one = one_chunk_each(ids, 16, seed=0)
    assert [len(c) for c in one] == [16] * len(ids) and one == one_chunk_each(ids, 16, seed=0)
    assert all(c[0] // 1000 == d and np.all(np.diff(c) == 1) for d, c in enumerate(one))  # contiguous, its own doc


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "seven", "table"]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 120))}) + "\n" for _ in range(300)))
    return path


def test_chunked_budgets_are_nested_prefixes_and_deterministic(tmp_path, text_corpus):
    spec = DatasetSpec(corpus=(str(text_corpus),), vocab_size=300, val_max_tokens=600, chunk_tokens=32)
    a, b = prepare_dataset(spec, tmp_path / "a"), prepare_dataset(spec, tmp_path / "b")
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]
    small, large = load_tokens(tmp_path / "a", "train", 500), load_tokens(tmp_path / "a", "train", 2000)
    assert np.array_equal(large[:500], small)
    import pyarrow.parquet as pq

    val = pq.read_table(tmp_path / "a" / a["splits"]["val"]["shards"][0]["file"]).to_pydict()
    assert len(set(val["doc_hash"])) == len(val["doc_hash"]) >= 10  # one chunk from each held-out document
    assert all(len(t) <= 32 for t in val["tokens"])
    train = pq.read_table(tmp_path / "a" / a["splits"]["train"]["shards"][0]["file"]).to_pydict()
    first = train["doc_hash"][: 500 // 32]
    assert len(set(first)) >= len(first) // 2  # the first budget's chunks come from many documents
    other = prepare_dataset(dataclasses.replace(spec, chunk_seed=1), tmp_path / "c")
    assert other["splits"]["train"]["shards"][0]["sha256"] != a["splits"]["train"]["shards"][0]["sha256"]


def test_whole_document_datasets_keep_their_inputs_key(text_corpus):
    key = _inputs_key(DatasetSpec(corpus=(str(text_corpus),)))
    assert "chunk_tokens" not in key["spec"] and "chunk_seed" not in key["spec"]  # existing manifests still match
    assert _inputs_key(DatasetSpec(corpus=(str(text_corpus),), chunk_tokens=64))["spec"]["chunk_tokens"] == 64


@pytest.mark.fast
def test_the_new_profiles_carry_the_design_of_issue_24():
    from train.model import get_shape

    p = load_profile("wiki-100k")
    params = [get_shape(q).non_embedding_params() for q in p.runs.presets]
    assert (p.data.vocab_size, p.runs.context, p.runs.tokens, len(p.runs.presets)) == (1024, 128, 100_000, 4)
    assert 0.06e6 < min(params) < 0.07e6 and 0.58e6 < max(params) < 0.6e6
    budgets = sorted({*p.data_law.budgets, p.runs.tokens})
    assert len(budgets) >= 5 and budgets[0] == 12_500 and budgets[-1] == 200_000
    assert len(p.data_law.budget_presets) >= 2
    assert p.members.seeds == p.members.k_max == 5 and p.recipes.search
    assert p.recipes.limits is not None  # one set of limits for both recipes
    assert p.data.chunk_tokens and p.gate.gate_epochs and p.distill.soft_students >= 2 and p.distill.soft_control
    assert p.data.val_tokens // p.data.chunk_tokens >= 100  # validation from >= 100 documents
    assert "h" in p.description and "Estimate" in p.description
    c = load_profile("calibration")
    assert c.data.calibration and not c.data.chunk_tokens and len(c.runs.presets) >= 4
    assert len(c.data_law.budgets) + 1 >= 5


@pytest.mark.parametrize("section, change, field", [
    ("gate", {"gate_epochs": (16, 4, 64)}, "gate.gate_epochs"),
    ("gate", {"gate_epochs": (4, 16)}, "gate.gate_epochs"),
    ("data", {"chunk_tokens": 1}, "data.chunk_tokens"),
    ("data_law", {"budget_seeds": 1}, "data_law.budget_seeds"),
    ("data", {"calibration": {"symbols": 64, "colour": 1}, "chunk_tokens": None}, "data.calibration"),
    ("data", {"calibration": {"symbols": 64}, "chunk_tokens": 256}, "data.chunk_tokens"),
])
@pytest.mark.fast
def test_bad_regime_fields_are_refused_by_name(section, change, field):
    record = load_profile("wiki-100k").model_dump()
    record[section].update(change)
    with pytest.raises(StudyError, match=f"field '{field}'"):
        validate_profile(record, "p.json")


@pytest.mark.fast
def test_the_gate_passes_with_the_effects_and_fails_without():
    overfits = {4: 6.10, 8: 5.95, 16: 5.97, 64: 6.30}
    ok = gate_verdict(6.20, 6.05, overfits, 0.05, 0.02)
    assert ok["passed"] and all(c["passed"] for c in ok["checks"])
    flat_n = gate_verdict(6.20, 6.18, overfits, 0.05, 0.02)  # the wiki-25k regime: loss barely falls with N
    assert not flat_n["passed"] and [c["passed"] for c in flat_n["checks"]] == [False, True]
    no_overfit = gate_verdict(6.20, 6.05, {4: 6.3, 8: 6.1, 16: 6.0, 64: 5.9}, 0.05, 0.02)
    assert not no_overfit["passed"] and [c["passed"] for c in no_overfit["checks"]] == [True, False]
    barely = gate_verdict(6.20, 6.05, {4: 6.1, 8: 6.0, 16: 6.005, 64: 6.01}, 0.05, 0.02)  # a rise within noise
    assert not barely["passed"]


def test_the_report_says_plainly_when_the_regime_cannot_show_the_effects(tmp_path):
    profile = load_profile("wiki-100k").recorded()
    verdict = gate_verdict(6.20, 6.18, {4: 6.3, 8: 6.1, 16: 6.0, 64: 5.9}, 0.05, 0.02)
    results = {"profile": profile, "phases_done": ["data", "gate"], "dataset": {"chunk_tokens": 256,
               "val_documents": 125}, "gate": {**verdict, "small": "cpu-xxs", "large": "cpu-xs2",
                                                "recipe": [8, 0.003, 1.6], "tokens": 100_000}}
    report = write_report(results, tmp_path, 10).read_text()
    assert "## Gate" in report and "cannot show the effects" in report and "FAILED" in report
    assert "shuffled across documents" in report and "125 held-out documents" in report


def test_a_study_begun_before_a_field_existed_resumes_and_a_changed_one_is_refused(tmp_path):
    profile = load_profile("micro")
    recorded = profile.recorded()
    stored = {"name": recorded["name"], "description": "reworded since"}  # flat, as results.json recorded it
    for section in ("data", "runs", "recipes", "members", "data_law", "serve", "distill", "downstream"):
        stored.update(recorded[section])
    for new in ("calibration", "chunk_tokens", "budget_seeds"):  # and the gate section, absent too
        del stored[new]
    (tmp_path / "results.json").write_text(json.dumps({"profile": stored}))
    Study(StudyConfig(profile=profile, out=str(tmp_path)))
    chunked = profile.model_copy(update={"data": profile.data.model_copy(update={"chunk_tokens": 64})})
    with pytest.raises(StudyError, match=r"differs in: data\.chunk_tokens\)"):
        Study(StudyConfig(profile=chunked, out=str(tmp_path)))
