"""synthdata annotate: the teacher's top-k over a dataset's training windows (against serve's PyTorch reference,
with member 0 alone as the negative control), exactly-once resume, and a soft-label student that reads them."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from synthdata.annotate import AnnotateConfig, Annotations, annotate
from synthdata.shards import JobError
from plumbing.artifacts import sha256_file
from train.data import DataError, load_tokens, windows

CONTEXT, TOKENS, K = 128, 3_000, 8


@pytest.fixture(scope="module")
def annotations(packed_teacher, tiny_dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("annotations") / "ann"
    cfg = AnnotateConfig(teacher=str(packed_teacher), data_dir=str(tiny_dataset), out=str(out), context=CONTEXT,
                         tokens=TOKENS, topk=K, windows_per_shard=8, progress=False)
    first = annotate(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    damaged = manifest["shards"][1]
    (out / damaged["file"]).write_bytes(b"not parquet")  # a corrupt shard: named and remade on the next run
    resumed = annotate(cfg)
    return {"out": out, "cfg": cfg, "first": first, "damaged": damaged, "resumed": resumed}


def test_annotations_are_the_ensembles_top_k_at_every_position(annotations, packed_teacher, tiny_members,
                                                               tiny_dataset):
    from serve.reference import ReferenceEnsemble
    from test_synth_job import reference_topk_error

    inputs, _ = windows(load_tokens(tiny_dataset, "train", TOKENS), CONTEXT)
    soft = Annotations.open(annotations["out"]).windows(tiny_dataset, CONTEXT, len(inputs))
    assert soft.ids.shape == (len(inputs), CONTEXT, K) and soft.valid.all()
    flat = type(soft)(soft.ids.reshape(-1, K), soft.logprobs.reshape(-1, K), soft.tail.reshape(-1),
                      soft.valid.reshape(-1))
    sample = list(inputs[:6])
    error, same = reference_topk_error(ReferenceEnsemble.from_dir(packed_teacher), sample, flat, K, True)
    assert error < 1e-4 and same > 0.99, (error, same)  # the last position (one generated step) included
    error, _ = reference_topk_error(ReferenceEnsemble.from_members([tiny_members[0]]), sample, flat, K, True)
    assert error > 1e-2, error


def test_annotation_resume_remakes_the_damaged_shard_identically(annotations):
    out, damaged = annotations["out"], annotations["damaged"]
    assert annotations["first"]["complete"] and annotations["resumed"]["complete"]
    assert annotations["resumed"]["scored_this_run"] == damaged["windows"] * CONTEXT  # only that shard redone
    assert sha256_file(out / damaged["file"]) == damaged["sha256"]
    again = annotate(annotations["cfg"])
    assert again["scored_this_run"] == 0


def test_annotations_of_another_context_or_too_few_tokens_are_refused(annotations, tiny_dataset):
    ann = Annotations.open(annotations["out"])
    with pytest.raises(DataError, match="context 128"):
        ann.windows(tiny_dataset, 64, 10)
    with pytest.raises(DataError, match="annotate a larger --tokens"):
        ann.windows(tiny_dataset, CONTEXT, 1000)
    with pytest.raises(JobError, match="holds another annotation job"):
        annotate(replace(annotations["cfg"], topk=K + 1))


def test_soft_label_student_reads_annotations_and_records_its_loss(annotations, tiny_dataset, synthetic_job,
                                                                   tmp_path):
    from distill.student import DistillConfig, DistillError, distill
    from train.trainer import TrainConfig

    cfg = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xs", tokens=TOKENS, epochs=2, lr=3e-3,
                      weight_decay=0.8, batch_size=8, context=CONTEXT)
    result = distill(DistillConfig(cfg, None, "ensemble", w=0.0, blend=0.5, annotations=str(annotations["out"])),
                     tmp_path / "soft", progress=False)
    soft = json.loads((tmp_path / "soft" / "run.json").read_text())["extra"]["distill"]["soft_labels"]
    assert soft["blend"] == 0.5 and soft["k"] == K and soft["real"] and not soft["synthetic"]
    assert result["mixture"]["synthetic_rows"] == 0 and np.isfinite(result["val_loss"])
    both = distill(DistillConfig(cfg, str(synthetic_job["out"]), "ensemble", w=0.5, blend=0.5,
                                 annotations=str(annotations["out"])), tmp_path / "both", progress=False)
    soft = json.loads((tmp_path / "both" / "run.json").read_text())["extra"]["distill"]["soft_labels"]
    assert soft["real"] and soft["synthetic"] and both["mixture"]["synthetic_rows"] > 0
    with pytest.raises(DistillError, match="give --blend"):
        distill(DistillConfig(cfg, None, "ensemble", w=0.0, annotations=str(annotations["out"])), tmp_path / "x")
    with pytest.raises(DistillError, match="does not fit"):
        distill(DistillConfig(cfg, None, "self", w=0.0, blend=0.5, annotations=str(annotations["out"])),
                tmp_path / "y")
