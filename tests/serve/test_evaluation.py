"""Validation loss of members and ensembles, against train/'s own evaluation and an independent recomputation."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from serve.evaluation import EvalError, load_model, mean_token_loss, validation_loss
from serve.reference import combine_member_logits
from train.data import IGNORE_INDEX, load_tokens, windows
from train.trainer import evaluate

CONTEXT = 128


@pytest.fixture(scope="module")
def val_windows(tiny_dataset):
    return windows(load_tokens(tiny_dataset, "val"), CONTEXT)


def trained_loss(member_dir) -> float:
    """train.trainer.evaluate's loss on the full validation windows, recorded when the member was trained."""
    return json.loads((member_dir / "chorus_run.json").read_text())["val_loss"]


def test_member_loss_equals_train_evaluate(tiny_dataset, tiny_members, val_windows):
    inputs, targets = (a[:40] for a in val_windows)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_members[0]), dtype=torch.float32)
    member = load_model([tiny_members[0]])
    assert mean_token_loss(member, inputs, targets, progress=False)[0] == pytest.approx(
        evaluate(hf, inputs, targets), rel=1e-5)
    record = validation_loss([tiny_members[0]], tiny_dataset, progress=False)  # all validation windows
    assert record["loss"] == pytest.approx(trained_loss(tiny_members[0]), rel=1e-5)
    assert record["tokens"] == int((val_windows[1] != IGNORE_INDEX).sum())
    assert record["members"] == 1 and record["context"] == CONTEXT


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_ensemble_loss_matches_members_combined_by_hand(tiny_dataset, tiny_members, val_windows, combine):
    inputs, targets = (a[:24] for a in val_windows)  # a slice is enough to compare two computations
    ensemble = load_model(tiny_members, combine)
    loss, count = mean_token_loss(ensemble, inputs, targets, batch_size=8, progress=False)
    # independent: each member separately through transformers, combined with the stated rule
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
    logits = torch.stack([AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)(input_ids=x).logits
                          for d in tiny_members]).detach()
    log_probs = combine_member_logits(logits, combine)
    mask = y != IGNORE_INDEX
    expected = float(-log_probs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean())
    assert count == int(mask.sum())
    assert loss == pytest.approx(expected, rel=1e-5)


def test_ensemble_beats_its_average_member(tiny_dataset, tiny_members):
    """The pilot's finding at this scale: logit-averaging three seeds lowers the loss."""
    members = [trained_loss(d) for d in tiny_members]
    ensemble = validation_loss(tiny_members, tiny_dataset, combine="logits", progress=False)
    assert ensemble["members"] == 3
    assert ensemble["loss"] < np.mean(members)


def test_tokenizer_mismatch_is_refused(tiny_dataset, tiny_members, tmp_path):
    import shutil

    other = tmp_path / "member"
    shutil.copytree(tiny_members[0], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(EvalError, match="another tokenizer"):
        validation_loss([other], tiny_dataset, progress=False)


def test_cli_loss_and_bad_input(tiny_dataset, tiny_members, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "bench", "loss", "--model", str(tiny_members[0]),
                         "--data-dir", str(tiny_dataset)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout.strip().splitlines()[-1])
    assert record["loss"] == pytest.approx(trained_loss(tiny_members[0]), rel=1e-5)
    bad = subprocess.run([sys.executable, "-m", "bench", "loss", "--model", str(tmp_path),
                          "--data-dir", str(tiny_dataset)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "not a model directory" in bad.stderr
