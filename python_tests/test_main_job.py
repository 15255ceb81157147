"""The README's main job and the diagnostics command, end to end on a tiny budget."""

import json
import subprocess
import sys

import pytest

from adapprox_kernels.train.__main__ import main
from adapprox_kernels.train.data import read_corpus
from adapprox_kernels.train.runner import warmup_cosine


def test_diagnostics_command():
    out = subprocess.run([sys.executable, "-m", "adapprox_kernels"], capture_output=True, text=True, check=True).stdout
    assert "adapprox_kernels" in out and "torch" in out
    assert "backends on cpu:" in out and "reference  usable" in out


def test_main_job_tiny(tmp_path, capsys):
    rc = main(
        ["--steps", "4", "--warmup", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
         "--seq-len", "16", "--max-bytes", "50000", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    for name in ("adapprox", "adamw", "adafactor", "came", "adamem", "adafactor-m", "galore"):
        assert name in table
    assert "vs AdamW" in table and "100.0%" in table
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["adapprox"]["state_bytes"] < runs["adamw"]["state_bytes"]
    assert runs["adapprox"]["final_mean_rank"] >= 1 and runs["adapprox"]["ranks"]
    assert runs["galore"]["state_bytes"] > runs["adafactor"]["state_bytes"]  # projector matrices counted
    assert len(runs["adamw"]["val_loss"]) == 2
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing", 1000)
    (tmp_path / "small.txt").write_text("too short")
    with pytest.raises(ValueError, match="at least"):
        read_corpus(tmp_path / "small.txt", 1000)


def test_schedule_warmup_then_cosine():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
