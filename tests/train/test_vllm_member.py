"""A member trained here loads in vLLM as is, with the same next-token log-probabilities as transformers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from train.data import load_tokens


def test_member_logprobs_match_between_transformers_and_vllm(tiny_members, tiny_dataset):
    from transformers import AutoModelForCausalLM

    member = tiny_members[0]
    stream = load_tokens(tiny_dataset, "val")
    sequences = [stream[i * 127 : i * 127 + 127].tolist() for i in range(4)]  # real held-out text; +1 generated fits 128
    script = Path(__file__).with_name("vllm_prompt_logprobs.py")
    res = subprocess.run([sys.executable, str(script), str(member), json.dumps(sequences)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    vllm_lp = np.array(json.loads(res.stdout.split("LOGPROBS=")[1]))

    model = AutoModelForCausalLM.from_pretrained(member, dtype=torch.float32).eval()
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    hf_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].numpy()
    assert vllm_lp.shape == hf_lp.shape == (4, 126)
    assert np.abs(vllm_lp - hf_lp).max() <= 1e-3
