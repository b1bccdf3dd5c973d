"""scripts/gpu_check.sh in its dry mode on the CPU: every check of the GPU script runs and passes at toy size."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--k", "2", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["resume"]["killed_mid_run"] and result["resume"]["max_abs_weight_diff"] == 0.0
    assert result["stacked"]["ok"] and len(result["stacked"]["val_losses"]) == 2
    assert result["throughput"]["tokens_per_s_median"] > 0 and 0 < result["throughput"]["mfu_vs_measured_peak"] < 1
    # without a GPU and without --dry-run it refuses, saying why
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no CUDA GPU here" in res.stderr
