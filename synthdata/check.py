"""Does the engine sample from the teacher's distribution? Checked against serve's PyTorch reference.

Two measurements on stored sequences:
1. agreement: the engine's reported log-probability of each sequence vs the reference's, per token;
2. calibration: over positions t, log p(x_t) - E_p[log p] has mean 0 when x_t ~ p (E_p[log p] = -H(p_t));
   its z-score tells a sampler drawing from another distribution apart, whatever it reports.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from synthdata.shards import read_manifest, read_rows
from synthdata.teacher import member_dirs, read_teacher


@torch.no_grad()
def sampling_check(out: str | Path, teacher_dir: str | Path, sequences: int = 48, batch_size: int = 16,
                   member: int | None = None) -> dict:
    """Both measurements on the first `sequences` rows of a job; against one member of the teacher if `member`
    is given (a negative control: samples of the ensemble should fail it)."""
    from serve.reference import ReferenceEnsemble

    out = Path(out)
    if member is None:
        reference = ReferenceEnsemble.from_dir(teacher_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            reference = ReferenceEnsemble.from_dir(member_dirs(read_teacher(teacher_dir), Path(tmp))[member])
    rows = read_rows(out, read_manifest(out), ["tokens", "length", "sample_logprob"], limit=sequences)
    width = max(r["length"] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r["length"]] = torch.tensor(r["tokens"])
    logp = torch.cat([reference.log_probs(ids[i : i + batch_size]) for i in range(0, len(rows), batch_size)])[:, :-1]
    sampled = logp.gather(-1, ids[:, 1:, None])[..., 0]  # log p(x_t | x_<t) for t >= 1
    neg_entropy = (logp.exp() * logp).sum(-1)
    mask = torch.arange(1, width)[None, :] < torch.tensor([r["length"] for r in rows])[:, None]
    reference_seq = (sampled * mask).sum(1).double().numpy()
    engine_seq = np.array([r["sample_logprob"] for r in rows])
    n_tokens = int(mask.sum())
    diff = (sampled - neg_entropy)[mask].double()
    return {"sequences": len(rows), "tokens": n_tokens,
            "mean_abs_logprob_diff_per_token": float(np.abs(reference_seq - engine_seq).sum() / n_tokens),
            "mean_sampled_logprob": float(sampled[mask].double().mean()),
            "mean_negative_entropy": float(neg_entropy[mask].double().mean()),
            "calibration_z": float(diff.mean() / (diff.std() / diff.numel() ** 0.5))}
