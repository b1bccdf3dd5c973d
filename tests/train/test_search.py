"""Coordinate descent on a small grid: certifies an optimum, resumes from its ledger, trains members on Ray."""
from __future__ import annotations

import json

import pytest

from train.members import joint_recipe, train_members
from train.search import Ledger, SearchSpace, coordinate_descent
from train.trainer import TrainConfig


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_neighbours_and_certification_rule():
    space = SearchSpace(epochs=(1, 2, 4), lrs=(1e-3, 3e-3), wds=(0.1, 0.8, 1.6))
    assert sorted(space.neighbours((1, 0, 1))) == [(0, 0, 1), (1, 0, 0), (1, 0, 2), (1, 1, 1), (2, 0, 1)]
    assert space.nearest(3, 2e-3, 1.0) in {(1, 0, 1), (2, 0, 1), (1, 1, 1), (2, 1, 1)}
    assert len(SearchSpace.default().neighbours((3, 3, 4))) == 6
    assert SearchSpace.standard().wds == (0.1,)
    assert joint_recipe(16, 0.8) == (32, 0.4) and joint_recipe(8, 0.1) == (16, 0.1)


def test_search_certifies_and_resumes_without_rerunning(tiny_dataset, tmp_path, ray_local):
    base = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xs", tokens=8_000, epochs=1, lr=1e-3,
                       weight_decay=0.1, batch_size=16, context=128, checkpoint_every=1000)
    space = SearchSpace(epochs=(1, 2), lrs=(1e-3, 3e-3), wds=(0.1, 0.8))
    outcome = coordinate_descent(base, space, tmp_path / "search", parallel=2)
    assert outcome["certified"]
    opt = outcome["optimum"]
    runs = {(r["epochs"], r["lr"], r["wd"]): r["val_loss"] for r in outcome["runs"]}
    assert runs[(opt["epochs"], opt["lr"], opt["wd"])] == opt["val_loss"]
    p = space.nearest(opt["epochs"], opt["lr"], opt["wd"])
    for q in space.neighbours(p):  # certified: every in-grid neighbour ran and none is lower
        assert runs[space.values(q)] >= opt["val_loss"]
    ledger_lines = (tmp_path / "search" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger_lines) == len(runs)

    again = coordinate_descent(base, space, tmp_path / "search", parallel=2)
    assert again["optimum"] == opt
    assert (tmp_path / "search" / "ledger.jsonl").read_text().splitlines() == ledger_lines  # nothing re-ran
    assert len(Ledger(tmp_path / "search" / "ledger.jsonl").records) == len(runs)


def test_k_members_on_ray_differ_only_by_seed(tiny_dataset, tmp_path, ray_local):
    configs = [TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xs", tokens=6_000, epochs=1, seed=s,
                           batch_size=16, context=128) for s in (0, 1)]
    results = train_members(configs, tmp_path / "members")
    assert [r["config"]["seed"] for r in results] == [0, 1]
    assert results[0]["val_loss"] != results[1]["val_loss"]
    for s in (0, 1):
        cfg = json.loads((tmp_path / "members" / f"seed-{s}" / "model" / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="distinct seeds"):
        train_members([configs[0], configs[0]], tmp_path / "dup")
