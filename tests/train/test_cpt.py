"""Continued pre-training (--init-from): the base's weights really are the start, the result is an ordinary member
that packs and serves, and a base that does not fit the run is refused by name."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plumbing.artifacts import sha256_file
from train.base import BaseModelError
from train.data import DatasetSpec, load_tokens, prepare_dataset, windows
from train.trainer import EpochBatches, TrainConfig, token_loss, train_member

REPO = Path(__file__).resolve().parents[2]


def _domain_corpus(path: Path, n: int = 300) -> Path:
    """Text of another kind than the base's corpus: Python-like code, made by code."""
    rng = np.random.default_rng(0)
    names = ["value", "items", "total", "index", "result", "count", "name", "data"]
    docs = []
    for i in range(n):
        a, b, c = rng.choice(names, 3)
        docs.append(f"def compute_{a}_{i}({b}, {c}=None):\n    \"\"\"Return the {a} of {b}.\"\"\"\n"
                    f"    if {c} is None:\n        {c} = len({b})\n    return sum({b}) / {c} + {i}\n")
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def cpt_dataset(tiny_members, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cpt")
    out = root / "data"
    prepare_dataset(DatasetSpec(corpus=(str(_domain_corpus(root / "code.jsonl")),), tokenizer=str(tiny_members[0])), out)
    return out


def _cfg(data_dir, base, **kw) -> TrainConfig:
    base_kw = dict(data_dir=str(data_dir), preset="", init_from=str(base), tokens=8_000, epochs=2, lr=1e-3,
                   weight_decay=0.4, seed=0, batch_size=8, context=128, warmup_frac=0.05, log_every=1, threads=1)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


def _first_step_loss(run_dir: Path) -> float:
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    return first["train_loss"]


def _batch0_loss(model_dir: Path, cfg: TrainConfig) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()  # the trainer's mode
    inputs, targets = windows(load_tokens(cfg.data_dir, "train", cfg.tokens), cfg.context)
    x, y = EpochBatches(inputs, targets, cfg.batch_size, cfg.epochs, cfg.seed).batch(0)
    with torch.no_grad():
        loss, n = token_loss(model, torch.from_numpy(x), torch.from_numpy(y))
    return float(loss) / n


def test_continued_member_starts_from_the_base(tiny_members, cpt_dataset, tmp_path):
    base = tiny_members[0]
    cfg = _cfg(cpt_dataset, base)
    result = train_member(cfg, tmp_path / "cpt", progress=False)
    first, expected = _first_step_loss(tmp_path / "cpt"), _batch0_loss(base, cfg)
    assert abs(first - expected) < 1e-5, (first, expected)
    # negative control: the same run from random weights starts far (over 1000x the tolerance above) from the
    # base's loss. (The base knows little about code: on the generated fixture corpus its loss there is near the
    # uniform 7.62, so the gap to a random start is ~0.04 nats, not the ~1 a Wikipedia base gave.)
    scratch = train_member(dataclasses.replace(cfg, init_from=None, preset="cpu-xs"), tmp_path / "scratch",
                           progress=False)
    assert abs(_first_step_loss(tmp_path / "scratch") - expected) > 1e-2
    # continued pre-training helps on the domain, and the member records what it continued from
    assert result["val_loss"] < scratch["val_loss"]
    run = json.loads((Path(result["model_dir"]) / "chorus_run.json").read_text())
    assert run["base"] == {"path": str(base.resolve()), "weights_sha256": sha256_file(base / "model.safetensors")}
    assert run["config"]["init_from"] == str(base.resolve())


def test_seeds_vary_the_data_order_not_the_start(tiny_members, cpt_dataset, tmp_path):
    cfg = _cfg(cpt_dataset, tiny_members[0], epochs=1)
    a = train_member(cfg, tmp_path / "s0", progress=False)
    b = train_member(dataclasses.replace(cfg, seed=1), tmp_path / "s1", progress=False)
    assert a["val_loss"] != b["val_loss"]
    assert _batch0_loss(tiny_members[0], cfg) != _batch0_loss(tiny_members[0], dataclasses.replace(cfg, seed=1))


def test_bad_bases_are_named(tiny_members, cpt_dataset, tiny_dataset, tmp_path):
    base = tiny_members[0]
    # a preset that disagrees with the base's shape
    with pytest.raises(BaseModelError, match="--preset cpu-s disagrees with the base .*hidden 128 vs base 64"):
        train_member(_cfg(cpt_dataset, base, preset="cpu-s"), tmp_path / "a", progress=False)
    # a context longer than the base's
    with pytest.raises(BaseModelError, match="--context 256 is longer than the base's context \\(128"):
        train_member(_cfg(cpt_dataset, base, context=256), tmp_path / "b", progress=False)
    # data tokenized with another tokenizer than the base's
    own = prepare_dataset(DatasetSpec(corpus=(str(_domain_corpus(tmp_path / "code.jsonl")),), vocab_size=400),
                          tmp_path / "own")
    assert own["tokenizer_sha256"] != json.loads((cpt_dataset / "manifest.json").read_text())["tokenizer_sha256"]
    with pytest.raises(BaseModelError, match="is not the base's .*tokenizer.json \\(sha256 differs\\)"):
        train_member(_cfg(tmp_path / "own", base), tmp_path / "c", progress=False)
    # a directory that is not a Llama model
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(BaseModelError, match=f"{other / 'config.json'}: not a Llama model"):
        train_member(_cfg(cpt_dataset, other), tmp_path / "d", progress=False)
    # weights that are not what the member recorded
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in base.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match="model.safetensors: corrupt"):
        train_member(_cfg(cpt_dataset, damaged), tmp_path / "e", progress=False)
    # the command line: one line, exit 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "train", "member", "--data-dir", str(cpt_dataset), "--init-from",
                          str(other), "--tokens", "2000", "--out", str(tmp_path / "f")], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "not a Llama model" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_cpt_ensemble_packs_and_serves(tiny_members, cpt_dataset, tmp_path):
    """K=2 continued members pack into one ensemble that vLLM serves with the members' logit average."""
    from transformers import LlamaForCausalLM

    from serve.pack import pack_ensemble

    cfg = _cfg(cpt_dataset, tiny_members[0], epochs=1)
    dirs = [Path(train_member(dataclasses.replace(cfg, seed=s), tmp_path / f"s{s}", progress=False)["model_dir"])
            for s in range(2)]
    packed = pack_ensemble(dirs, tmp_path / "ensemble")
    stream = load_tokens(cpt_dataset, "val")
    sequences = [stream[i * 100: i * 100 + 100].tolist() for i in range(3)]
    script = REPO / "tests" / "train" / "vllm_prompt_logprobs.py"
    res = subprocess.run([sys.executable, str(script), str(packed), json.dumps(sequences)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr[-3000:]
    served = np.array(json.loads(res.stdout.split("LOGPROBS=")[1]))
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logits = torch.stack([LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(ids).logits for d in dirs])
    expected = torch.log_softmax(logits.mean(0), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].numpy()
    assert np.abs(served - expected).max() <= 1e-3
    # negative control: one member alone is measurably not the ensemble
    alone = torch.log_softmax(logits[0], -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].numpy()
    assert np.abs(served - alone).max() > 1e-2
