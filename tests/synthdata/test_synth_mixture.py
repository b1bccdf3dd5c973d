"""synthdata/ mixture mode: each sequence from one member drawn at random (one engine per member).

Slow: a replica is K engines (three here), which is more than the default suite should start."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from synthdata.job import GenerateConfig, generate, read_manifest
from synthdata.teacher import member_dirs, read_teacher


@pytest.mark.slow
def test_mixture_rows_come_from_their_drawn_member(packed_teacher, tmp_path, monkeypatch):
    from serve.reference import ReferenceEnsemble

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out = tmp_path / "mixture"
    summary = generate(GenerateConfig(teacher=str(packed_teacher), tokens=2_000, out=str(out), mode="mixture",
                                      shard_tokens=1_000, progress=False))
    assert summary["tokens"] == 2_000 and summary["complete"]
    rows = [r for s in read_manifest(out)["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]
    members = [r["member"] for r in rows]
    assert set(members) == {0, 1, 2}
    # each row's reported log-prob is its member's, not another member's
    dirs = member_dirs(read_teacher(packed_teacher), out / "teacher-members")
    other_member_gaps = []
    for m, d in enumerate(dirs):
        reference = ReferenceEnsemble.from_dir(d)
        for r in rows:
            ids = torch.tensor([r["tokens"]])
            logp = reference.log_probs(ids)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0].sum().item()
            gap = abs(logp - r["sample_logprob"]) / r["length"]
            if r["member"] == m:
                assert gap < 1e-3, (m, logp, r["sample_logprob"])
            else:
                other_member_gaps.append(gap)
    assert np.mean(other_member_gaps) > 3e-3  # the other members would have reported other log-probs
