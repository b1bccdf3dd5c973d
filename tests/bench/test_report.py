"""Reports: tables carry asymptotes with uncertainty and flags; plots are written as PNG files; the CLI fits and reports."""
import json
import subprocess
import sys

import numpy as np

from bench.fits import data_efficiency, fit_joint_limit, fit_power_law
from bench.report import (efficiency_table, fit_table, joint_limit_table, markdown_table, plot_data_efficiency,
                          plot_scaling)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_cells():
    table = markdown_table(["name", "value"], [["a|b", 3.14159265], ["c", float("nan")]])
    assert table.splitlines() == ["| name | value |", "|---|---|", "| a\\|b | 3.142 |", "| c | n/a |"]


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
