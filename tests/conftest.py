"""Shared fixtures: a small dataset and a few tiny trained members, built once per test session.

The core fixtures (`tiny_dataset` and everything built on it) are made from text generated in code
(`train/synthetic_text.py`, seed 0: an English-like language with a Zipfian vocabulary, a grammar and
per-document topics), so every clone builds them: nothing is read from ../shared and nothing is downloaded.
`generated_eval_dir` stands in for ../shared/data/eval: task files in the same formats (PIQA, ARC-Easy, BoolQ,
LAMBADA), made from the fixture dataset's validation text.

../shared/data (the Wikipedia corpus, the eval sets) serves only extra tests that say so: they are marked
`shared_data`, explicitly (`@pytest.mark.shared_data`) or by asking for the `wiki_corpus` or `eval_dir`
fixture (conftest marks those tests at collection), and they skip with the reason where ../shared/data is
absent (or wherever $CHORUS_SHARED_DATA points). `pytest -m shared_data` runs just them.

A skip of any other test is a failure: the `pytest_runtest_makereport` hook below rewrites the skip report
of a test not marked shared_data into a failure naming the skip's reason, so a fresh clone cannot pass by
skipping its core tests. (An expected failure, `xfail`, is left alone; deselection with `-m` is not a skip.)
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CHORUS_SHARED_DATA", REPO.parent / "shared" / "data"))
WIKI = SHARED_DATA / "corpus" / "enwiki2015_30k.jsonl.zst"
EVAL_DIR = SHARED_DATA / "eval"
SHARED_FIXTURES = frozenset({"wiki_corpus", "eval_dir"})  # a test asking for one is marked shared_data
FIXTURE_CORPUS_CHARS, FIXTURE_CORPUS_SEED = 2_000_000, 0


def require(path: Path) -> Path:
    """`path` in ../shared/data, or a skip naming it; for tests marked shared_data only (see the docstring)."""
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is absent on this machine)")
    return path


@pytest.hookimpl(tryfirst=True)  # before -m selects: `-m shared_data` sees the marks added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared_data)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("shared_data") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"a core test skipped ({reason}); only tests marked shared_data may skip "
                           "(tests/conftest.py)")


@pytest.fixture(scope="session")
def wiki_corpus() -> Path:
    return require(WIKI)


@pytest.fixture(scope="session")
def fixture_corpus(tmp_path_factory) -> Path:
    """The generated corpus (JSON lines): ~2M characters, the same on every machine."""
    from train.synthetic_text import write_corpus

    return write_corpus(tmp_path_factory.mktemp("fixture_corpus") / "generated.jsonl", FIXTURE_CORPUS_CHARS,
                        FIXTURE_CORPUS_SEED)


@pytest.fixture(scope="session")
def tiny_dataset(fixture_corpus, tmp_path_factory) -> Path:
    """The generated corpus as a dataset: a 2048-token BPE, ~480k training tokens, 20k validation tokens."""
    from train.data import DatasetSpec, prepare_dataset

    out = tmp_path_factory.mktemp("tiny_dataset")
    prepare_dataset(DatasetSpec(corpus=(str(fixture_corpus),), vocab_size=2048, max_chars=FIXTURE_CORPUS_CHARS,
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


# ---- synthdata/ and distill/ -------------------------------------------------------------------

SYNTH_TOKENS, SYNTH_SHARD_TOKENS, SYNTH_TOPK = 12_000, 1_500, 8


@pytest.fixture(scope="session")
def packed_teacher(tiny_members, tmp_path_factory) -> Path:
    """The three tiny members packed into one logit-averaged ensemble directory."""
    from serve.pack import pack_ensemble

    return pack_ensemble(tiny_members, tmp_path_factory.mktemp("teacher") / "ensemble")


@pytest.fixture(scope="session")
def synthetic_job(packed_teacher, tmp_path_factory) -> dict:
    """A finished `python -m synthdata generate` job on the packed teacher, made the hard way: the first
    run is killed with SIGKILL after its first shard is recorded; before the re-run one recorded shard is
    corrupted and a stray temp file planted. Tests read the job and what was done to it, so the kill/resume
    check and every test that needs synthetic tokens share two engine starts."""
    import json
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path_factory.mktemp("synthetic") / "job"
    cmd = [sys.executable, "-m", "synthdata", "generate", "--teacher", str(packed_teacher),
           "--tokens", str(SYNTH_TOKENS), "--shard-tokens", str(SYNTH_SHARD_TOKENS), "--out", str(out),
           "--no-progress", "--topk", str(SYNTH_TOPK),
           # a shallow queue, so shards finish one by one and the kill lands mid-job: with the whole 12k-token job
           # in flight, all 8 shards were recorded before the kill (and the resume then remade the corrupted shard
           # alone, at another batch size, which changed its top-k log-probs in the last bits)
           "--inflight", "4"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log_path = out.parent / "first-run.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        manifest_path, deadline = out / "manifest.json", time.time() + 600
        shards_at_kill = []
        while time.time() < deadline and proc.poll() is None:
            if manifest_path.exists():
                shards_at_kill = json.loads(manifest_path.read_text())["shards"]
                if shards_at_kill:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, f"the first run ended before the kill:\n{log_path.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(3)
        try:  # Ray's own processes die with their driver; make sure nothing of ours survives either way
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    manifest = json.loads(manifest_path.read_text())
    corrupted = manifest["shards"][0]
    import pyarrow.parquet as pq

    original_rows = pq.read_table(out / corrupted["file"]).to_pylist()  # what the remade shard must equal
    (out / corrupted["file"]).write_bytes(b"not parquet")
    (out / "shard-99999.parquet.tmp").write_bytes(b"half-written")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"out": out, "cmd": cmd, "env": env, "shards_at_kill": manifest["shards"], "corrupted": corrupted,
            "corrupted_rows": original_rows,
            "resume_log": resumed.stderr, "summary": json.loads(resumed.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_members, tmp_path_factory) -> Path:
    """The first two tiny members packed as one K=2 logit-averaging ensemble directory (serve/)."""
    from serve.pack import pack_ensemble

    return pack_ensemble(tiny_members[:2], tmp_path_factory.mktemp("tiny_ensemble") / "ens-k2")


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    """../shared/data/eval: the zero-shot multiple-choice tasks (JSON lines). Marks its tests shared_data."""
    return require(EVAL_DIR)


# ---- eval sets generated in code -----------------------------------------------------------------

GENERATED_EVAL_TASKS = ("piqa", "arc_easy", "boolq", "lambada_openai")  # what the micro profile and the tests read
GENERATED_EVAL_ITEMS = 60


def generated_eval_items(text: str, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """`n` items of each of GENERATED_EVAL_TASKS in the formats of ../shared/data/eval (the same keys and query
    templates), made from held-out generated text:

    - piqa: "Question: <a sentence's first half>\\n", two choices: its own second half and another sentence's;
    - arc_easy: "Question: <first half>", four choices: its own second half and three others';
    - boolq: "Passage: <ten sentences>\\nQuestion: does the passage say <word>?", choices no/yes (gold: whether
      the word is in the passage); passages are longer than the tiny models' window, so contexts are cut from the
      left, as BoolQ's are;
    - lambada_openai: a cloze, {"context": a sentence but its last word, "continuation": that word}.

    The gold answers are real (the true continuation, the word's presence), but nothing needs a model to beat
    chance on them: the tests compare scorers with each other, not accuracies with a target."""
    import numpy as np

    sentences = list(dict.fromkeys(s.strip() for s in text.replace("\n", " ").split(".") if len(s.split()) >= 6))
    if len(sentences) < 3 * n + 10:
        raise ValueError(f"{len(sentences)} sentences of six words or more; {3 * n + 10} needed for {n} items a task")
    halves = [(" ".join(s.split()[: len(s.split()) // 2]), " ".join(s.split()[len(s.split()) // 2:]) + ".")
              for s in sentences]
    rng = np.random.default_rng(seed)

    def choices_with(true: int, k: int) -> tuple[list[str], int]:
        """The second half of sentence `true` and k-1 other, distinct second halves; the gold position."""
        ends = [halves[true][1]]
        while len(ends) < k:
            end = halves[int(rng.integers(len(halves)))][1]
            if end not in ends:
                ends.append(end)
        gold = int(rng.integers(k))
        ends[0], ends[gold] = ends[gold], ends[0]
        return ends, gold

    items: dict[str, list[dict]] = {name: [] for name in GENERATED_EVAL_TASKS}
    for i in range(n):
        choices, gold = choices_with(2 * i, 2)
        items["piqa"].append({"query": f"Question: {halves[2 * i][0]}\n", "choices": choices, "gold": gold})
        choices, gold = choices_with(2 * n + i, 4)
        items["arc_easy"].append({"query": f"Question: {halves[2 * n + i][0]}", "choices": choices, "gold": gold})
        passage_sentences = [sentences[(3 * n + 10 * i + j) % len(sentences)] for j in range(10)]
        passage = ". ".join(passage_sentences) + "."
        pool = passage_sentences if rng.integers(2) else sentences  # half the words come from the passage itself
        source = pool[int(rng.integers(len(pool)))]
        word = str(rng.choice(source.split()))
        items["boolq"].append({"query": f"Passage: {passage}\nQuestion: does the passage say {word}?",
                               "choices": ["no", "yes"], "gold": int(f" {word}" in f" {passage}")})
        words = sentences[2 * i + 1].split()
        items["lambada_openai"].append({"context": " ".join(words[:-1]), "continuation": words[-1]})
    return items


@pytest.fixture(scope="session")
def generated_eval_dir(tiny_dataset, tmp_path_factory) -> Path:
    """An eval directory like ../shared/data/eval for every clone: GENERATED_EVAL_ITEMS items of each of
    GENERATED_EVAL_TASKS (`<task>.jsonl`, the same formats), made from the fixture dataset's validation text, which
    no fixture model trains on (see generated_eval_items)."""
    from train.data import load_tokenizer, load_tokens

    tokenizer = load_tokenizer(tiny_dataset / "tokenizer")
    text = tokenizer.decode(load_tokens(tiny_dataset, "val").tolist(), skip_special_tokens=True)
    out = tmp_path_factory.mktemp("generated_eval")
    for name, records in generated_eval_items(text, GENERATED_EVAL_ITEMS).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


# ---- reliability suite -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for one module's server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- kill -9 and resume --------------------------------------------------------------------------

def kill_once_past_checkpoint(cmd: list[str], out: Path, timeout_s: float, **popen) -> None:
    """Start a training command (train/ or distill/) and kill -9 it once a checkpoint exists and training has
    moved past it, so the resume must both reload the checkpoint and redo the steps after it."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (out / "checkpoint.json").exists():
            ckpt_step = json.loads((out / "checkpoint.json").read_text())["step"]
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            if ckpt_step >= 10 and lines and json.loads(lines[-1])["step"] > ckpt_step:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists(), "the run finished before it could be killed; make it longer"


@pytest.fixture
def kill_past_checkpoint():
    return kill_once_past_checkpoint


# ---- a resume, not a restart -------------------------------------------------------------------------
# On the CPU a run restarted from scratch ends with bit-identical weights, so equal weights cannot tell a resume
# from a restart. The resumed process is therefore run under STEP_RECORDER, which records every training step
# the process executes (train.trainer.lr_at is called once per step of a lone run, K times per step of a stack),
# and the test checks that it executed exactly the steps after the checkpoint. CHORUS_TEST_IGNORE_CHECKPOINT=1
# makes load_checkpoint find nothing: the negative control, a restart, which must fail that check.

STEP_RECORDER = r"""
import json, os, runpy, sys
import train.stacked, train.trainer
steps, real_lr_at = [], train.trainer.lr_at
def lr_at(step, *args, **kwargs):
    if not steps or steps[-1] != step:
        steps.append(step)
    return real_lr_at(step, *args, **kwargs)
train.trainer.lr_at = train.stacked.lr_at = lr_at
if os.environ.get("CHORUS_TEST_IGNORE_CHECKPOINT") == "1":
    train.trainer.load_checkpoint = train.stacked.load_checkpoint = lambda *args, **kwargs: None
try:
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    with open(os.environ["CHORUS_TEST_STEPS"], "w") as f:
        json.dump(steps, f)
"""


def run_recording_steps(cmd: list[str], record: Path, ignore_checkpoint: bool = False,
                        **run_kwargs) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run `cmd` ([python, "-m", module, *args]) as it is, but under STEP_RECORDER: (the process, the steps it
    executed). `ignore_checkpoint`: the negative control (a load_checkpoint that returns None)."""
    assert cmd[1] == "-m", cmd
    env = {**run_kwargs.pop("env", os.environ), "CHORUS_TEST_STEPS": str(record)}
    if ignore_checkpoint:
        env["CHORUS_TEST_IGNORE_CHECKPOINT"] = "1"
    proc = subprocess.run([cmd[0], "-c", STEP_RECORDER, *cmd[2:]], env=env, capture_output=True, text=True,
                          **run_kwargs)
    return proc, json.loads(record.read_text()) if record.exists() else []


def assert_did_only_the_remaining_steps(steps: list[int], checkpoint_step: int, total: int) -> None:
    """The resumed process executed steps checkpoint_step .. total-1, each once, and nothing before them."""
    assert 0 < checkpoint_step < total, (checkpoint_step, total)
    assert steps == list(range(checkpoint_step, total)), (
        f"resumed from the checkpoint at step {checkpoint_step} of {total}, the process should have run only "
        f"steps {checkpoint_step}..{total - 1}; it ran {len(steps)} steps "
        f"({steps[0] if steps else '-'}..{steps[-1] if steps else '-'})")
