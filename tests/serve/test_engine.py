"""The full correctness matrix of the vLLM ensemble model (slow: one engine start per case).

For K in {1, 2, 3} and both combine rules, prompt log-probabilities from vLLM's offline engine equal
the PyTorch reference's (fp32, max abs diff <= 1e-3); a K=1 ensemble equals its member served alone.
The default run checks K=2 "logits" through the Ray Serve endpoint instead (tests/serve/test_app.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from serve.engine import offline_engine, prompt_logprobs
from serve.pack import pack_ensemble
from serve.reference import ReferenceEnsemble
from train.data import load_tokens

pytestmark = pytest.mark.slow
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def rows(tiny_dataset) -> list[list[int]]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    stream = load_tokens(tiny_dataset, "val")
    return [stream[i * 128 : i * 128 + 120].tolist() for i in range(4)]


def reference_scores(model_dir, rows) -> torch.Tensor:
    ids = torch.tensor(rows)
    lp = ReferenceEnsemble.from_dir(model_dir).log_probs(ids)
    return lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def engine_scores(model_dir, rows) -> torch.Tensor:
    with offline_engine(model_dir, max_model_len=128, kv_cache_bytes=256 << 20) as llm:
        return torch.tensor(prompt_logprobs(llm, rows))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_engine_equals_reference(tiny_members, rows, tmp_path, k, combine):
    packed = pack_ensemble(tiny_members[:k], tmp_path / f"k{k}-{combine}", combine=combine)
    diff = (engine_scores(packed, rows) - reference_scores(packed, rows)).abs().max().item()
    print(f"K={k} {combine}: max abs diff engine vs reference {diff:.2e}")
    assert diff <= TOLERANCE


def test_k1_ensemble_equals_member_served_alone(tiny_members, rows, tmp_path):
    packed = pack_ensemble(tiny_members[:1], tmp_path / "k1")
    diff = (engine_scores(packed, rows) - engine_scores(tiny_members[0], rows)).abs().max().item()
    print(f"K=1 ensemble vs member served alone: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
