"""The benchmark scripts run end to end on a tiny model (their figures are only meaningful on real models; here the
point is that they work and that every generation path they time gives the same answers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    """benchmarks/ppo_step.py --preset tiny --baseline-ref HEAD --vs "--zero_stage 0": step 3 launched for HEAD (in a
    git worktree, its own code imported), for this tree, and for this tree with the variant's flags; the split and
    samples/s read from each metrics log, both ratios printed."""
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
                           "--vs", "--zero_stage 0", "--output", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(out.read_text())
    assert [r["label"] for r in results["runs"]] == ["baseline0", "current0", "vs1-0"]
    assert [("ZeRO-0" in r["workload"], "ZeRO-2" in r["workload"]) for r in results["runs"]] == \
        [(False, True), (False, True), (True, False)]
    for run in results["runs"]:
        assert run["steps"] == 2 and run["samples_per_s"] > 0 and run["answer_tokens_per_s"] > 0
        assert set(run["split_s"]) == {"generation", "scoring", "update", "other"}
        assert sum(run["split_s"].values()) == pytest.approx(run["step_s"], rel=1e-6, abs=1e-3)
    assert results["ratio"] > 0 and "ratio current / HEAD" in proc.stdout
    assert results["vs1"]["ratio"] > 0 and "ratio '--zero_stage 0' / current" in proc.stdout
    assert worktrees() == before  # its worktree removed afterwards


def test_ppo_step_variants_take_lone_flags_and_keep_the_base_command_line():
    """`--vs --offload` is a variant, not an argparse error; each variant is the base flags plus its own."""
    ppo_step = load_benchmark("ppo_step")
    argv = ppo_step.joined_vs(["--preset", "dschat", "--zero_stage", "3", "--vs", "--offload",
                               "--vs", "--lora_dim 16", "--vs=--dtype fp32"])
    assert ppo_step.parse_args(argv).vs == ["--offload", "--lora_dim 16", "--dtype fp32"]
    base = ppo_step.without_vs(argv)
    offload = ppo_step.parse_args(base + ["--offload"])
    assert offload.offload and offload.zero_stage == 3 and not offload.vs


def test_sampling_benchmark_times_both_samplers_and_puts_the_fast_one_back(tiny_model_dir, monkeypatch):
    import torch

    from chatrlhf.training import generation

    bench = load_benchmark("sampling")
    seen = []
    real = generation.sample_categorical
    monkeypatch.setattr(generation, "sample_categorical", lambda probs: seen.append(1) or real(probs))
    results = bench.main(["--model", str(tiny_model_dir("llama")), "--rows", "2", "--prompt_len", "4",
                          "--new_tokens", "3", "--threads", "1", "--rounds", "2", "--dtype", "fp32"])
    assert len(results[2]["pairs_s"]) == 2 and all(r > 0 for r in results[2]["ratios"])
    assert len(seen) == 2 + 2 * 3  # the warm-up and the inverse-CDF arm only, one draw per token
    assert generation._categorical_sampling.__name__ == "_categorical_sampling"  # put back
    assert torch.multinomial.__module__ == "torch"


@pytest.mark.distributed
def test_collectives_benchmark_times_gloo_and_shared_memory(tmp_path):
    """benchmarks/collectives.py launches its own two ranks and prints both timings and their ratio per collective
    (skipped where DeepSpeed's shared-memory op cannot be used)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(BENCHMARKS / "collectives.py"), "--values", "1e5", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if "not available here" in proc.stdout + proc.stderr:
        pytest.skip("DeepSpeed's shared-memory op is not available on this machine")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("all_gather_into_tensor", "all_reduce"):
        assert any(line.strip().startswith(f"{name}: gloo") and "ratio" in line for line in proc.stdout.splitlines()), \
            proc.stdout
