"""Reports: tables carry asymptotes with uncertainty and flags; plots are written as PNG files; the CLI fits and reports."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bench.science.fits import data_efficiency, fit_joint_limit, fit_power_law
from bench.science.report import (efficiency_table, fit_table, joint_limit_table, markdown_table, plot_data_efficiency,
                          plot_scaling)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.fast
def test_markdown_table_formats_cells():
    table = markdown_table(["name", "value"], [["a|b", 3.14159265], ["c", float("nan")]])
    assert table.splitlines() == ["| name | value |", "|---|---|", "| a\\|b | 3.142 |", "| c | n/a |"]


@pytest.mark.fast
def test_fit_tables_show_uncertainty_and_flags():
    n = np.array([0.15, 0.3, 0.6, 1.4, 2.8])
    good = fit_power_law(n, 0.05 / n + 3.43, n_boot=20)
    bad = fit_power_law([0.15, 0.3], [3.84, 3.79])
    table = fit_table({"regularized": good, "standard": bad}, "N")
    assert "3.430 ± " in table
    assert "need >= 4" in table
    joint = fit_joint_limit([(m, k, 0.3 / k + 0.05 / m + 3.17) for m in n[:4] for k in (1, 2, 3, 4)], n_boot=10)
    assert "joint (N, K -> inf) | 3.170 ± " in joint_limit_table(joint)
    law = fit_power_law([0.2, 0.4, 0.8, 1.6, 3.2], [2.0 / d**0.25 + 3.0 for d in (0.2, 0.4, 0.8, 1.6, 3.2)], n_boot=20)
    assert "4.50x" in efficiency_table({"joint": data_efficiency(law, 2.0 / 0.9**0.25 + 3.0, 0.2)})


@pytest.mark.fast
def test_plots_are_png(tmp_path):
    n = np.repeat([0.15, 0.3, 0.6, 1.4], 2)
    loss = 0.05 / n + 3.43 + np.tile([0.002, -0.002], 4)
    fit = fit_power_law(n, loss, n_boot=20)
    path = plot_scaling({"regularized": (n, loss, fit), "standard": ([0.15, 0.3], [3.9, 3.8], None)},
                        tmp_path / "loss_vs_n.png", "parameters (B)", "loss vs N")
    assert path.read_bytes()[:8] == PNG_MAGIC
    d = np.array([0.2, 0.4, 0.8, 1.6, 3.2])
    law = fit_power_law(d, 2.0 / d**0.25 + 3.0, n_boot=20)
    path = plot_data_efficiency(law, {"joint": data_efficiency(law, 4.9, 0.2), "beyond": data_efficiency(law, 2.9, 0.2)},
                                tmp_path / "efficiency.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.fast
def test_cli_fit_and_report(tmp_path):
    points = tmp_path / "points.jsonl"
    records = [{"recipe": "regularized", "n": n, "loss": 0.05 / n + 3.43} for n in (0.15, 0.3, 0.6, 1.4, 2.8)]
    records += [{"recipe": "standard-data", "n": d, "loss": 2.0 / d**0.25 + 3.0} for d in (0.2, 0.4, 0.8, 1.6, 3.2)]
    points.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = subprocess.run([sys.executable, "-m", "bench", "fit", "--points", str(points), "--x", "n", "--series",
                          "recipe", "--n-boot", "20"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| regularized |" in run.stdout and "3.430 ± " in run.stdout
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "bench", "report", "--points", str(points), "--x", "n", "--series",
                          "recipe", "--n-boot", "20", "--out", str(out), "--data-law", "standard-data",
                          "--reached", "regularized=4.9@0.2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = (out / "REPORT.md").read_text()
    assert "Data efficiency" in report and "x |" in report
    assert (out / "scaling.png").read_bytes()[:8] == PNG_MAGIC and (out / "efficiency.png").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"n": 1}\n')
    run = subprocess.run([sys.executable, "-m", "bench", "fit", "--points", str(bad), "--x", "n"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "bad.jsonl:1" in run.stderr and "'loss'" in run.stderr


def _claims(reg_curve, self_gain):
    """The claims table for a minimal analysis: a regularized law over N, an ensemble law over K at the top size
    (asymptote 0.1 below), the joint limit, and a self-distillation gain."""
    from types import SimpleNamespace

    from bench.science.fits import Interval, fit_joint_limit
    from bench.science.report import claims_section
    from bench.study.analysis import Gain
    from bench.study.profile import load_profile

    noise = np.tile([0.003, 0.0, -0.003], 6)
    n, k = np.repeat([0.25, 0.5, 1, 2, 4, 8], 3), np.repeat([1, 2, 3, 4, 5, 6], 3)
    reg = fit_power_law(n, reg_curve(n) + noise, n_boot=100)
    ens = fit_power_law(k, 0.3 / k + 2.9 + noise, n_boot=100)
    joint = fit_joint_limit([(m, kk, 0.3 / kk + 0.05 / m + 2.8 + e) for m in (0.25, 0.5, 1, 2, 4)
                             for kk in (1, 2, 3, 4, 5) for e in (0.003, 0.0, -0.003)], n_boot=100)
    a = SimpleNamespace(size_laws={"regularized": reg}, per_k={"cpu-xs": ens}, joint=joint, efficiencies={},
                        local_efficiencies={}, data_law=None, gains_per_n={},
                        gains={"self": Gain(self_gain, Interval(self_gain - 0.05, self_gain + 0.05, 100, 100))})
    main = load_profile("main").recorded()
    profile = {**main, "runs": {**main["runs"], "presets": ["cpu-xs"], "tokens": 1000},
               "members": {**main["members"], "k_max": 5}}
    results = {"profile": profile, "members": {"cpu-xs": {}},
               "search": {"cpu-xs": {"standard": {"certified": True}, "regularized": {"certified": False}}}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in "".join(claims_section(results, a)).splitlines()}
    return rows


@pytest.mark.fast
def test_claims_table_withholds_numbers_from_a_flagged_law_and_calls_reversals_contradicted():
    good = _claims(lambda n: 0.1 / n**0.5 + 3.0, self_gain=0.1)
    # control: every law passes its lack-of-fit test, so the verdicts are computed from the intervals
    assert good["(b) ensemble asymptote (K -> inf) below the regularized one"].endswith("| supported |")
    assert "-0.100 nats" in good["(b) ensemble asymptote (K -> inf) below the regularized one"]
    assert good["(c) the joint limit (N, K -> inf) is the lowest"].endswith("| supported |")
    assert good["(f) self-distillation beats its teacher"].endswith("| supported |")
    assert "no size has a measured gain over a certified standard optimum" in good["(a) tuned wd > 0.1 beats the standard recipe"]
    # the regularized law now has a step no power law follows: (b) and (c) rest on it and are withheld
    bad = _claims(lambda n: 0.1 / n**0.5 + 3.0 + 0.05 * (n >= 2), self_gain=-0.1)
    for claim in ("(b) ensemble asymptote (K -> inf) below the regularized one",
                  "(c) the joint limit (N, K -> inf) is the lowest"):
        assert "withheld" in bad[claim] and "nats" not in bad[claim]
        assert "cannot be resolved at this scale: law flagged: regularized over N, lack of fit p = " in bad[claim]
    # a reversal whose interval excludes 0 is a contradiction, not "cannot resolve"
    assert "| contradicted" in bad["(f) self-distillation beats its teacher"]


@pytest.mark.fast
def test_efficiency_table_says_why_a_multiplier_is_not_quoted():
    d = np.repeat([0.2, 0.4, 0.8, 1.6, 3.2], 3)
    noise = np.tile([0.004, 0.0, -0.004], 5)
    good = fit_power_law(d, 2.0 / d**0.25 + 3.0 + noise, n_boot=50)
    bad = fit_power_law(d, 2.0 / d**0.25 + 3.0 + noise + 0.05 * (d == 0.8), n_boot=50)
    table = efficiency_table({"good": data_efficiency(good, 5.0, 0.2), "bad": data_efficiency(bad, 5.0, 0.2)})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert "| yes |" in rows["good"] and "| no: law flagged |" in rows["bad"]


def _cpt_results(standard_curve) -> dict:
    """A finished tiny CPT study's results.json: 2 standard seeds and 2 regularized members (K = 1, 2) per budget,
    the regularized recipe reaching about the standard one's loss with 1/1.5 of its tokens."""
    import dataclasses

    from bench.cpt_study import PROFILES

    profile = PROFILES["tiny"]
    rows = []
    for d in profile.budgets:
        for recipe, loss in (("standard", standard_curve(d)), ("regularized", standard_curve(1.5 * d))):
            rows += [{"recipe": recipe, "x": d, "seeds": [s], "loss": loss + e} for s, e in enumerate((0.005, -0.005))]
            rows.append({"recipe": recipe, "x": d, "seeds": [0, 1], "loss": loss - 0.01})
    return {"profile": json.loads(json.dumps(dataclasses.asdict(profile))), "base": "b", "regularized_wd": 0.8,
            "wd_search": {"0.8": 4.0}, "base_domain_loss": 6.0, "student_domain_loss": 4.0, "losses": {},
            "forgetting_wiki_loss": {"base": 5.0}, "evaluations": rows, "wall_s": 60.0}


@pytest.mark.fast
def test_cpt_report_only_withholds_the_flagged_law_and_quotes_local_multipliers(tmp_path):
    from bench.cpt_study import report_only

    for name, curve in (("true", lambda d: 2.0 / (d / 1000) ** 0.3 + 3.0),
                        ("step", lambda d: 2.0 / (d / 1000) ** 0.3 + 3.0 - 0.1 * (d >= 8000))):
        out = tmp_path / name
        out.mkdir()
        (out / "results.json").write_text(json.dumps(_cpt_results(curve)))
        report = report_only(out).read_text()
        answer = report.split("## Answer")[1].split("##")[0]
        law_quoted = "through the data law inside its fitted range, is at best" in answer
        assert law_quoted == (name == "true"), answer  # the control: the true law is quoted
        assert ("the law is flagged" in answer and "lack of fit" in answer) == (name == "step")
        local = answer.split("Interpolated between the measured budgets")[1]
        assert "x [" in local and "at every D (not quoted)" not in local  # quoted with or without a law
        assert json.loads((out / "results.json").read_text())["local_efficiencies"]


def _claim_a(standard_certified: bool, regularized_certified: bool, lo: float, hi: float, wd: float = 1.6) -> str:
    from types import SimpleNamespace

    from bench.science.fits import Interval
    from bench.science.verdicts import _claim_a
    from bench.study.analysis import Gain

    search = {"cpu-xs": {"standard": {"certified": standard_certified},
                         "regularized": {"certified": regularized_certified, "wd": wd}}}
    a = SimpleNamespace(gains_per_n={"cpu-xs": {"regularization": Gain((lo + hi) / 2, Interval(lo, hi, 100, 100))}})
    return _claim_a(search, a, ["cpu-xs"])[-1]


@pytest.mark.fast
def test_claim_a_needs_a_certified_baseline_and_reads_an_uncertified_new_recipe_as_a_lower_bound():
    # both optima certified: the interval decides, either way
    assert _claim_a(True, True, 0.1, 0.3) == "supported"
    assert _claim_a(True, True, -0.3, -0.1).startswith("contradicted")
    # the regularized optimum not certified: a better one could only widen a gain, so a gain above 0 supports ...
    assert _claim_a(True, False, 0.1, 0.3).startswith("supported (a lower bound")
    # ... but a gain whose interval reaches 0 (or a reversal) decides nothing: the regularized side may improve
    for lo, hi in ((-0.05, 0.1), (-0.3, -0.1)):
        assert _claim_a(True, False, lo, hi).startswith("cannot be resolved at this scale: the regularized optimum")
    # control: the same gain over an uncertified standard optimum is no evidence (a better baseline may exist)
    assert _claim_a(False, True, 0.1, 0.3).startswith("cannot be resolved at this scale: no size has a measured gain")
    assert _claim_a(True, True, 0.1, 0.3, wd=0.1).startswith("contradicted: the tuned wd is not above 0.1")


def _student_claims(gains: dict) -> dict:
    from types import SimpleNamespace

    from bench.science.fits import Interval
    from bench.science.verdicts import claim_rows
    from bench.study.analysis import Gain
    from bench.study.profile import load_profile

    a = SimpleNamespace(size_laws={}, per_k={}, joint=None, efficiencies={}, local_efficiencies={}, data_law=None,
                        gains_per_n={}, gains={k: Gain(v, Interval(v - 0.05, v + 0.05, 100, 100)) for k, v in gains.items()})
    results = {"profile": load_profile("main").recorded(), "members": {"cpu-xs": {}},
               "search": {"cpu-xs": {"standard": {"certified": False}, "regularized": {"certified": False}}}}
    return {r[0]: r[-1] for r in claim_rows(results, a)}


@pytest.mark.fast
def test_soft_label_students_answer_claims_e_and_f_when_they_are_the_students_there_are():
    rows = _student_claims({"soft_kept": 0.7, "ensemble_over_best": 0.1, "soft_self": -0.2})
    assert rows["(e) the soft-label student keeps most (> 50%) of the ensemble's gain"] == "supported"
    assert rows["(f) soft-label self-distillation beats its teacher"].startswith("contradicted")
    assert not any(claim.startswith("(e) the student") for claim in rows)  # no sequence-level student: no row
    # control: an ensemble that does not beat the best single model leaves no gain to keep
    rows = _student_claims({"soft_kept": 0.7, "ensemble_over_best": 0.02})
    assert rows["(e) the soft-label student keeps most (> 50%) of the ensemble's gain"].startswith(
        "cannot be resolved at this scale: the ensemble does not beat")
