"""The CNN benchmark's quick mode end to end: records, bus bandwidth and plots are well formed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(170)
def test_sweep_quick(tmp_path) -> None:
    out = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweep", "--quick", "--out", str(out)],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=160,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quick sweep OK" in proc.stdout
    records = [json.loads(line) for line in (out / "cnn.jsonl").read_text().splitlines()]
    assert sorted(r["np"] for r in records) == [1, 2]
    assert all(r["images_per_sec"] > 0 and 0 <= r["allreduce_share"] <= 1 for r in records)
    for png in ("scaling_inception1.png", "busbw.png"):
        assert (out / png).stat().st_size > 1000
    impls = {row["impl"] for row in json.loads((out / "busbw.json").read_text())["rows"]}
    assert len(impls) == 3
