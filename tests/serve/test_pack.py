"""Packing and the PyTorch reference: fast, no engine."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from safetensors.torch import load_file

from serve.pack import (PackError, check_combine, ensemble_members, extract_member, member_state_dicts, pack_ensemble,
                        read_config, split_member_name, weights_sha256)
from serve.reference import ReferenceEnsemble, combine_member_logits
from plumbing.artifacts import sha256_file
from train.data import load_tokens

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_pack_layout(tiny_members, tmp_path):
    out = pack_ensemble(tiny_members, tmp_path / "ens", combine="probs")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ChorusEnsembleForCausalLM"]
    assert config["chorus_ensemble"] == {"members": 3, "combine": "probs",
                                         "member_sha256": [weights_sha256(m) for m in tiny_members],
                                         "weights_sha256": sha256_file(out / "model.safetensors")}
    assert ensemble_members(out) == 3 and ensemble_members(tiny_members[0]) == 1
    with safe_open(out / "model.safetensors", framework="pt") as f, \
            safe_open(tiny_members[1] / "model.safetensors", framework="pt") as m1:
        names = set(f.keys())
        assert {n.split(".", 1)[0] for n in names} == {"m0", "m1", "m2"}
        assert len(names) == 3 * len(list(m1.keys()))
        for name in m1.keys():
            assert torch.equal(f.get_tensor("m1." + name), m1.get_tensor(name))
    assert (out / "tokenizer.json").read_bytes() == (tiny_members[0] / "tokenizer.json").read_bytes()
    assert not (out / "chorus_run.json").exists()
    # the same pack again is reused; a different one into the same place is refused
    assert pack_ensemble(tiny_members, out, combine="probs") == out
    with pytest.raises(PackError, match="already exists"):
        pack_ensemble(tiny_members, out, combine="logits")


def test_pack_refuses_mismatched_members(tiny_members, tmp_path):
    wide = tmp_path / "wide"
    config = LlamaConfig.from_pretrained(tiny_members[0])
    config.intermediate_size *= 2
    LlamaForCausalLM(config).save_pretrained(wide)
    for f in tiny_members[0].glob("tokenizer*"):
        shutil.copy(f, wide / f.name)
    with pytest.raises(PackError, match="intermediate_size"):
        pack_ensemble([tiny_members[0], wide], tmp_path / "bad")

    other_tok = tmp_path / "other_tok"
    shutil.copytree(tiny_members[1], other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(PackError, match="different tokenizers"):
        pack_ensemble([tiny_members[0], other_tok], tmp_path / "bad")
    with pytest.raises(PackError, match="combine rule"):
        pack_ensemble(tiny_members, tmp_path / "bad", combine="median")
    assert not (tmp_path / "bad").exists()


def test_cli_pack_reports_bad_input(tiny_members, tmp_path):
    run = subprocess.run([sys.executable, "-m", "serve", "pack", "--members", str(tiny_members[0]),
                          str(tmp_path / "missing"), "--out", str(tmp_path / "ens")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "missing is not a directory" in run.stderr


def test_combine_rules_match_their_definitions():
    logits = torch.randn(3, 2, 5, 11, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    expected_probs = torch.log(probs.mean(0))
    geometric = torch.exp(torch.log(probs).mean(0))
    expected_logits = torch.log(geometric / geometric.sum(-1, keepdim=True))
    assert torch.allclose(combine_member_logits(logits, "probs"), expected_probs, atol=1e-12)
    assert torch.allclose(combine_member_logits(logits, "logits"), expected_logits, atol=1e-12)
    assert math.isclose(float(combine_member_logits(logits, "probs").exp().sum(-1).mean()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_reference_equals_members_run_one_by_one(tiny_members, tiny_dataset, tmp_path, combine):
    ids = torch.from_numpy(load_tokens(tiny_dataset, "val")[: 2 * 64].astype("int64")).view(2, 64)
    ensemble = ReferenceEnsemble.from_dir(pack_ensemble(tiny_members, tmp_path / "ens", combine=combine))
    assert (ensemble.k, ensemble.combine) == (3, combine)
    with torch.no_grad():
        logits = torch.stack([LlamaForCausalLM.from_pretrained(m).eval()(ids).logits for m in tiny_members])
    assert torch.allclose(ensemble.log_probs(ids), combine_member_logits(logits, combine), atol=1e-5)
    single = ReferenceEnsemble.from_dir(tiny_members[0])
    assert single.k == 1
    assert torch.allclose(single.log_probs(ids), torch.log_softmax(logits[0], -1), atol=1e-5)


def test_unpack_gives_back_each_member(tiny_members, tmp_path):
    """serve.pack's readers (what the engine, the reference and synthdata's teacher use) return every member's
    own tensors, in order; a plain member reads as a pack of one; an extracted member is that member's directory."""
    out = pack_ensemble(tiny_members, tmp_path / "ens")
    originals = [load_file(m / "model.safetensors") for m in tiny_members]
    unpacked = member_state_dicts(out)
    assert len(unpacked) == 3
    for original, member in zip(originals, unpacked):
        assert set(member) == set(original) and all(torch.equal(member[n], original[n]) for n in original)
    # negative control: the comparison tells members apart
    assert not all(torch.equal(unpacked[0][n], originals[1][n]) for n in originals[1])
    single = member_state_dicts(tiny_members[2])
    assert len(single) == 1 and all(torch.equal(single[0][n], originals[2][n]) for n in originals[2])

    extracted = extract_member(out, 1, tmp_path / "m1")
    assert weights_sha256(extracted) != weights_sha256(tiny_members[0])
    assert all(torch.equal(t, originals[1][n]) for n, t in load_file(extracted / "model.safetensors").items())
    config = read_config(extracted)
    assert config["architectures"] == ["LlamaForCausalLM"] and "chorus_ensemble" not in config
    assert (extracted / "tokenizer.json").exists()
    with pytest.raises(PackError, match="no member 3"):
        extract_member(out, 3, tmp_path / "m3")


def test_member_names_and_combine_rule_are_checked():
    assert split_member_name("m2.model.norm.weight", 3) == (2, "model.norm.weight")
    for bad in ("m3.model.norm.weight", "model.norm.weight", "mx.a", "m1"):
        with pytest.raises(PackError, match="not a member tensor"):
            split_member_name(bad, 3)
    assert check_combine("probs") == "probs"
    with pytest.raises(PackError, match="choose one of logits, probs"):
        check_combine("median")
