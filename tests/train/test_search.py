"""Coordinate descent: the paper's certification rule on fake objectives (pure, no training), then a real
search that certifies and resumes from its ledger, and K members that differ only by seed."""
from __future__ import annotations

import json

import pytest

from train.members import joint_recipe, train_members
from train.search import SearchSpace, run_ledger, coordinate_descent, descend, ladder_step
from train.trainer import TrainConfig


def bowl(optimum, scale=(1.0, 1.0, 1.0)):
    """A fake objective: a separable bowl in log epochs, log lr and wd, lowest at `optimum`; counts its calls."""
    import math

    asked = []

    def objective(points):
        asked.extend(points)
        e0, lr0, wd0 = optimum
        return {p: scale[0] * math.log2(p[0] / e0) ** 2 + scale[1] * math.log10(p[1] / lr0) ** 2
                + scale[2] * (p[2] - wd0) ** 2 for p in points}
    objective.asked = asked
    return objective


@pytest.mark.fast
def test_ladders_follow_the_papers_grids():
    assert [ladder_step("epochs", 16, 1), ladder_step("epochs", 16, -1), ladder_step("epochs", 1, -1)] == [32, 8, None]
    assert [ladder_step("lr", 3e-3, 1), ladder_step("lr", 1e-2, 1), ladder_step("lr", 1e-3, -1)] == [1e-2, 3e-2, 3e-4]
    assert [ladder_step("wd", 6.4, 1), ladder_step("wd", 0.1, -1), ladder_step("wd", 0.0, 1),
            ladder_step("wd", 0.0, -1)] == [12.8, 0.0, 0.1, None]
    space = SearchSpace.default()
    for axis, grid in zip(("epochs", "lr", "wd"), space.grids()):  # the ladders reproduce the paper's grids
        assert [ladder_step(axis, v, 1) for v in grid[:-1]] == list(grid[1:]), axis


@pytest.mark.fast
def test_interior_optimum_is_certified_with_all_six_neighbours_worse():
    objective = bowl((8, 1e-3, 0.8))
    d = descend(SearchSpace.default(), (2, 1e-2, 0.1), objective)
    assert d.optimum == (8, 1e-3, 0.8) and d.certified and "all 6 neighbours" in d.reason
    neighbours, edges, _ = SearchSpace.default().neighbours(d.optimum)
    assert len(neighbours) == 6 and not edges
    assert all(d.losses[q] > d.loss for q in neighbours)  # the rule, checked on what ran


@pytest.mark.fast
def test_edge_optimum_extends_the_grid_and_is_found_beyond_it():
    # the true optimum is past the grid's top wd (6.4) and epochs (64): the grid grows to reach it
    space = SearchSpace(epochs=(8, 16), lrs=(3e-3,), wds=(0.8, 1.6))
    d = descend(space, (8, 3e-3, 0.8), bowl((64, 3e-3, 12.8)))
    assert d.optimum == (64, 3e-3, 12.8) and d.certified
    assert {32, 64, 128} <= set(d.space.epochs) and {3.2, 6.4, 12.8, 25.6} <= set(d.space.wds)
    assert {1e-3, 1e-2} <= set(d.space.lrs)  # the single-valued lr axis was extended both ways and checked


@pytest.mark.fast
def test_optimum_at_a_limit_is_never_certified():
    space = SearchSpace(epochs=(8, 16), lrs=(3e-3,), wds=(0.8, 1.6, 3.2),
                        limits=((1, 16), (1e-4, 1e-1), (0.0, 3.2)))
    d = descend(space, (8, 3e-3, 0.8), bowl((64, 3e-3, 12.8)))
    assert d.optimum == (16, 3e-3, 3.2)
    assert not d.certified and "edge" in d.reason and "epochs above 16" in d.reason and "wd above 3.2" in d.reason
    # negative control: the same space with the optimum inside certifies
    assert descend(space, (8, 3e-3, 0.8), bowl((8, 3e-3, 1.6))).certified


@pytest.mark.fast
def test_a_tie_or_running_out_of_rounds_is_not_certified():
    flat = lambda points: {p: 1.0 for p in points}
    d = descend(SearchSpace.default(), (8, 1e-3, 0.8), flat)
    assert not d.certified and "tie" in d.reason
    d = descend(SearchSpace.default(), (1, 1e-4, 0.0), bowl((64, 3e-2, 6.4)), max_rounds=2)
    assert not d.certified and "after 2 rounds" in d.reason


@pytest.mark.fast
def test_standard_recipe_fixes_wd_and_certifies_on_four_neighbours():
    objective = bowl((4, 3e-3, 3.2))  # its wd optimum is elsewhere: the standard recipe must not move wd
    d = descend(SearchSpace.standard(), (16, 1e-3, 0.1), objective)
    assert d.optimum == (4, 3e-3, 0.1) and d.certified and "all 4 neighbours" in d.reason
    assert {p[2] for p in objective.asked} == {0.1}


@pytest.mark.fast
def test_neighbours_and_joint_recipe():
    space = SearchSpace(epochs=(1, 2, 4), lrs=(1e-3, 3e-3), wds=(0.1, 0.8, 1.6), limits=((1, 4), (1e-3, 3e-3), (0.1, 1.6)))
    neighbours, edges, _ = space.neighbours((2, 1e-3, 0.8))
    assert sorted(neighbours) == [(1, 1e-3, 0.8), (2, 1e-3, 0.1), (2, 1e-3, 1.6), (2, 3e-3, 0.8), (4, 1e-3, 0.8)]
    assert edges == ["lr below 0.001: outside the search (lr limited to 0.001..0.003)"]
    assert space.nearest(3, 2e-3, 1.0) in {(2, 1e-3, 0.8), (4, 1e-3, 0.8), (2, 3e-3, 0.8), (4, 3e-3, 0.8)}
    assert SearchSpace.standard().wds == (0.1,) and SearchSpace.standard().fixed == ("wd",)
    assert joint_recipe(16, 0.8) == (32, 0.4) and joint_recipe(8, 0.1) == (16, 0.1)
    with pytest.raises(ValueError, match="ascending"):
        SearchSpace(epochs=(2, 1), lrs=(1e-3,), wds=(0.1,))


@pytest.mark.slow
def test_search_certifies_and_resumes_without_rerunning(tiny_dataset, tmp_path):
    base = TrainConfig(data_dir=str(tiny_dataset), preset="cpu-xs", tokens=8_000, epochs=1, lr=1e-3,
                       weight_decay=0.1, batch_size=16, context=128, checkpoint_every=1000)
    space = SearchSpace(epochs=(1, 2), lrs=(1e-3, 3e-3), wds=(0.1, 0.8), limits=((1, 2), (1e-3, 3e-3), (0.1, 0.8)))
    outcome = coordinate_descent(base, space, tmp_path / "search")
    opt = outcome["optimum"]
    runs = {(r["epochs"], r["lr"], r["wd"]): r["val_loss"] for r in outcome["runs"]}
    assert runs[(opt["epochs"], opt["lr"], opt["wd"])] == opt["val_loss"]
    neighbours, edges, _ = space.neighbours((opt["epochs"], opt["lr"], opt["wd"]))
    assert outcome["certified"] == (not edges and all(runs[q] > opt["val_loss"] for q in neighbours))
    assert not outcome["certified"]  # a 2-point grid at its limits: every optimum sits on an edge
    ledger_lines = (tmp_path / "search" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger_lines) == len(runs)

    again = coordinate_descent(base, space, tmp_path / "search")
    assert again["optimum"] == opt
    assert (tmp_path / "search" / "ledger.jsonl").read_text().splitlines() == ledger_lines  # nothing re-ran
    assert len(run_ledger(tmp_path / "search").records) == len(runs)


def test_k_members_differ_only_by_seed(tiny_dataset, tmp_path):
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
