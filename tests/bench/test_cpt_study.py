"""bench/cpt_study end to end on its tiny profile: a base, CPT with both recipes, K-seed ensembles, a distilled
student, the standard recipe's data law, multipliers and forgetting, and a report that says them."""
from __future__ import annotations

import json

import pytest

from bench.cpt_study import PROFILES, render, run


@pytest.mark.slow
def test_tiny_cpt_study_runs_and_resumes(wiki_corpus, tmp_path):
    domain = tmp_path / "code.jsonl"
    domain.write_text("".join(json.dumps({"text": f"def f{i}(items):\n    return sum(items) * {i} / len(items)\n"
                                                  f"# the {i % 7}th helper of module m{i % 13}\n"}) + "\n"
                              for i in range(1500)))
    out = tmp_path / "study"
    profile = PROFILES["tiny"]
    results = run(out, profile, (str(domain),), str(wiki_corpus))
    # CPT on the domain beats the base as is; the ensemble beats its members; the student is a CPT model too
    reg1 = results["losses"][f"regularized K=1 @ D={max(profile.budgets)}"]["loss"]
    regk = results["losses"][f"regularized K={profile.k} @ D={max(profile.budgets)}"]["loss"]
    assert reg1 < results["base_domain_loss"] and regk < reg1
    assert results["standard_law"]["identified"]  # 4 budgets x 2 seeds > 3 parameters
    for e in results["efficiencies"].values():  # an interval, never [x, x]
        assert e["multiplier"] == "n/a" or e["lo"] < e["hi"]
    report = (out / "REPORT.md").read_text()
    assert "## Forgetting" in report and "data_efficiency.png" in report and (out / "data_efficiency.png").exists()
    assert report == render(results, profile)
    # resumable: a re-run trains and evaluates nothing new and gives the same numbers
    evaluations = (out / "evaluations.jsonl").read_text()
    again = run(out, profile, (str(domain),), str(wiki_corpus))
    assert again["losses"] == results["losses"] and (out / "evaluations.jsonl").read_text() == evaluations
