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


def test_ppo_step_benchmark_times_this_tree_against_a_commit(tiny_model_dir, tmp_path):
    """benchmarks/ppo_step.py --preset tiny --baseline-ref HEAD: step 3 launched for HEAD (in a git worktree, its own
    code imported) and for this tree, the split and samples/s read from each metrics log, the ratio printed."""
    import subprocess
    import sys

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS.parent, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    def worktrees():
        listed = subprocess.run(["git", "worktree", "list"], cwd=BENCHMARKS.parent, capture_output=True, text=True)
        return listed.stdout

    before = worktrees()
    out = tmp_path / "ppo.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "ppo_step.py"), "--preset", "tiny", "--model",
                           str(tiny_model_dir("llama")), "--cache", str(tmp_path / "cache"), "--baseline-ref", "HEAD",
                           "--output", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(out.read_text())
    assert [r["label"] for r in results["runs"]] == ["baseline0", "current0"]
    for run in results["runs"]:
        assert run["steps"] == 2 and run["samples_per_s"] > 0 and run["answer_tokens_per_s"] > 0
        assert set(run["split_s"]) == {"generation", "scoring", "update", "other"}
        assert sum(run["split_s"].values()) == pytest.approx(run["step_s"], rel=1e-6, abs=1e-3)
    assert results["ratio"] > 0 and "ratio current / HEAD" in proc.stdout
    assert worktrees() == before  # its worktree removed afterwards
