"""The largest-model search on tiny CPU models: real trials in subprocesses, then its CSV."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tried(stdout):
    return [line.split(":")[1].split("layers")[0].strip() for line in stdout.splitlines() if "->" in line]


def test_search_gallops_up_and_writes_the_csv(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "largest_model.py"), "--method", "stronghold",
           "--hidden", "32", "--heads", "4", "--seq", "16", "--batch", "2", "--start", "2", "--max-layers", "5",
           "--out", str(tmp_path), "--", "--window-size", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _tried(proc.stdout) == ["2", "3", "5"]  # start, +1, +2; the next step (+4) passes the cap
    with open(tmp_path / "largest_stronghold.csv") as f:
        row = next(csv.DictReader(f))
    assert row["largest layers"] == "5" and row["card"] == "cpu"
    assert float(row["params (B)"]) > 0
    assert (tmp_path / "log_stronghold_l-5_hs-32_bs-2.txt").exists()


def test_search_gallops_down_when_the_first_size_fails(tmp_path):
    # --window-size 0 is refused at every size: the search halves down to 1 and reports 0 layers.
    cmd = [sys.executable, os.path.join(ROOT, "tools", "largest_model.py"), "--method", "stronghold",
           "--hidden", "32", "--heads", "4", "--seq", "16", "--batch", "2", "--start", "4",
           "--out", str(tmp_path), "--", "--window-size", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _tried(proc.stdout) == ["4", "2", "1"]
    with open(tmp_path / "largest_stronghold.csv") as f:
        assert next(csv.DictReader(f))["largest layers"] == "0"
