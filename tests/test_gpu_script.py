"""The prepared GPU benchmark runs end to end at tiny sizes on the CPU (its --tiny rehearsal, one measurement of each
kind), so that its first GPU run does not fail on a typo. Slow: it starts worker processes and compiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _worker(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu.py"), "--worker", "--device", "cpu", *argv],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-2000:]
    return json.loads(lines[0][len("RESULT ") :])


@pytest.mark.slow
def test_gpu_benchmark_measures_mfu_graphs_and_the_breakdown_at_tiny_sizes():
    result = _worker("--mode", "mfu", "--model", "tiny", "--backend", "sdpa", "--compiled", "--fused", "--profile",
                     "--warmup", "0", "--steps", "1")  # fmt: skip
    assert result["tokens"] == 4096 and result["tiles"] > 0 and result["graphs"] >= 2
    phases = result["breakdown"]
    assert all(sum(phases[p].values()) > 0 for p in ("vision fwd", "decoder fwd", "decoder bwd", "optimizer"))
    assert phases["decoder fwd"]["gemm"] > 0 and phases["decoder fwd"]["attention"] > 0


@pytest.mark.slow
def test_gpu_benchmark_times_the_models_gemms_at_tiny_sizes():
    result = _worker("--mode", "ceiling", "--model", "tiny")
    assert {g["what"] for g in result["gemms"]} >= {"decoder q", "decoder gate, up", "head", "vision qkv"}
    assert result["tflop_per_s"] > 0
