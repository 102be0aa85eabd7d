"""The largest-model search on tiny CPU models: real trials in subprocesses, then its CSV."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_grows_then_bisects_and_writes_the_csv(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "largest_model.py"), "--method", "stronghold",
           "--hidden", "32", "--heads", "4", "--seq", "16", "--batch", "2", "--start", "2", "--max-layers", "5",
           "--out", str(tmp_path), "--", "--window-size", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tried = [line.split(":")[1].split("layers")[0].strip() for line in proc.stdout.splitlines() if "->" in line]
    assert tried == ["2", "4", "5"]  # doubling stops at the cap, then bisection between 4 and 6
    with open(tmp_path / "largest_stronghold.csv") as f:
        row = next(csv.DictReader(f))
    assert row["largest layers"] == "5" and row["card"] == "cpu"
    assert float(row["params (B)"]) > 0
    assert (tmp_path / "log_stronghold_l-5_hs-32_bs-2.txt").exists()
