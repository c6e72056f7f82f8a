"""The benchmark scripts run end to end on a tiny model (their figures are only meaningful on real models; here the
point is that they work and that every generation path they time gives the same answers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.distributed
def test_generation_benchmark_two_ranks(tiny_model_dir, tmp_path, deepspeed_launch):
    out = tmp_path / "generation.json"
    proc = deepspeed_launch(str(BENCHMARKS / "generation.py"),
                            ["--model", tiny_model_dir("llama"), "--batch_size", 2, "--new_tokens", 4,
                             "--max_prompt_len", 16, "--repeats", 1, "--layers_per_gather", 1, "--output", out],
                            timeout=400)
    results = json.loads(out.read_text())
    assert results["ranks"] == 2
    for dtype in ("bf16", "fp32"):
        r = results[f"zero3_{dtype}"]
        assert r["outputs_identical"] and r["layer_groups_identical"], r
        assert r["speedup"] > 0 and r["layer_groups_speedup"] > 0
    assert "ratio" in proc.stdout and "layers at a time" in proc.stdout
