"""The PPO-step benchmark: samples/s, answer tokens/s and each step's split (generation, scoring, update, other) of
a real step-3 run, optionally against another commit, interleaved.

  python benchmarks/ppo_step.py --preset dschat                          # the dschat workload (below)
  python benchmarks/ppo_step.py --preset dschat --zero_stage 3           # ... with ZeRO-3 actor and critic
  python benchmarks/ppo_step.py --preset dschat --lora_dim 16            # ... LoRA r=16, base frozen
  python benchmarks/ppo_step.py --preset dschat --baseline-ref 412944a   # A, B, A, B against a commit: the ratio
  python benchmarks/ppo_step.py --preset dschat --vs "--zero_stage 3" --vs "--lora_dim 16"   # settings, A, B, C
  python benchmarks/ppo_step.py --preset dschat --advantage_estimator grpo   # 4 answers a prompt, no critic/ref
  python benchmarks/ppo_step.py --preset dschat --step3-args "--kl_coef 0.1 --top_k 50"   # any step-3 flags
  python benchmarks/ppo_step.py --preset tiny --model DIR                # seconds, on a tiny model: the smoke test

The dschat workload: SmolLM2-135M-Instruct actor (`smollm2-135m-instruct`, converted once), a reward model that is
the same backbone with a seeded linear head (made once in the cache folder: AutoModelForSequenceClassification,
num_labels=1) as critic start and reward, HH-RLHF prompts from the bundled sample (over 128 tokens dropped), answers
of at most 64 tokens, 2 ranks under `deepspeed --num_gpus 2`, ZeRO-2, bf16, 4 prompts per rank and step, 1 PPO
epoch, no LoRA, no gradient checkpointing, one thread per rank; 8 steps, the first 2 left out as warm-up.

Each run is `deepspeed --num_gpus N training/step3_ppo/main.py ...` in the repository being timed (this one, or
`--baseline-ref`'s commit checked out in a temporary `git worktree`, its own code imported through a PYTHONPATH
shim), and the figures come from its metrics.jsonl: the `time/*` metrics of each step and the wall time between
steps (whatever the step does outside the three timed parts is "other"). Any commit whose step 3 logs time/* can
be timed. The machine's CPU use during each run (from /proc/stat) is printed with it: on a shared machine compare
ratios of interleaved runs, not absolute figures.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "inference", "utils")  # chatrlhf.<name> -> <repo>/<name> (setup.py's mapping)

PRESETS = {
    "dschat": dict(model="smollm2-135m-instruct", ranks=2, threads=1, zero_stage=2, dtype="bf16", batch_size=4,
                   max_prompt_seq_len=128, max_answer_seq_len=64, steps=8, warmup=2),
    # The smoke test: any tiny causal LM folder (--model), a few steps of a few tokens.
    "tiny": dict(model=None, ranks=1, threads=1, zero_stage=2, dtype="fp32", batch_size=2, max_prompt_seq_len=32,
                 max_answer_seq_len=6, steps=3, warmup=1),
}


# ---- the reward model: the actor's backbone with a seeded head --------------------------------------------
def cache_dir(args) -> Path:
    if args.cache:
        return Path(args.cache)
    from chatrlhf.utils.smollm2 import default_cache_dir

    return Path(default_cache_dir()) / "bench"


def reward_model(base: str, cache: Path, seed: int = 0) -> Path:
    """`<cache>/<base name>-reward-seed<seed>`: `base` as AutoModelForSequenceClassification (num_labels=1) with a
    head drawn from N(0, 1/(hidden+1)) under `seed`, and its tokenizer; made once (locked, atomic)."""
    from chatrlhf.utils.models import model_location

    path = model_location(base)
    target = cache / f"{Path(path).name.lower()}-reward-seed{seed}"
    marker = target / ".complete"
    if marker.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = model.score.weight
            w.copy_(torch.randn(w.shape, generator=g) / (model.config.hidden_size + 1) ** 0.5)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
        model.save_pretrained(work, safe_serialization=True)
        AutoTokenizer.from_pretrained(path).save_pretrained(work)
        (work / ".complete").write_text(f"{base} seed={seed}\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(work, target)
    return target


# ---- one run of step 3 ---------------------------------------------------------------------------------
def step3_flags(args, model: str, reward: str, out: Path, data_cache: Path) -> list[str]:
    """The step-3 command line of the workload; only flags that commit 412944a already had, unless asked for."""
    train_bs = args.batch_size
    flags = ["--actor_model_name_or_path", model, "--critic_model_name_or_path", reward,
             "--actor_zero_stage", args.zero_stage, "--critic_zero_stage", args.zero_stage, "--dtype", args.dtype,
             "--data_path", "hh-rlhf-demo", "--max_prompt_seq_len", args.max_prompt_seq_len, "--overlength", "drop",
             "--max_answer_seq_len", args.max_answer_seq_len, "--per_device_generation_batch_size", args.batch_size,
             "--ppo_epochs", 1, "--max_steps", args.steps, "--eval_iters", 1, "--per_device_eval_batch_size", 1,
             "--resume", "false", "--output_dir", out, "--data_output_path", data_cache]
    if args.lora_dim:
        flags += ["--actor_lora_dim", args.lora_dim, "--critic_lora_dim", args.lora_dim, "--only_optimize_lora"]
    if args.offload:
        flags += ["--offload"]
    if args.gradient_checkpointing:
        flags += ["--actor_gradient_checkpointing", "--critic_gradient_checkpointing"]
    if args.advantage_estimator:
        flags += ["--advantage_estimator", args.advantage_estimator]
        if args.advantage_estimator != "gae":  # group estimators: a group of answers a prompt, no critic, no KL
            flags += ["--n_samples_per_prompt", args.samples_per_prompt, "--kl_coef", 0]
            train_bs = args.batch_size * args.samples_per_prompt  # still one minibatch a rollout
    flags += ["--per_device_training_batch_size", train_bs]
    if args.generation_backend != "hf":  # a flag older commits lack: only when asked for
        flags += ["--generation_backend", args.generation_backend]
    return [str(f) for f in flags] + shlex.split(args.step3_args)


def shim(repo: Path, where: Path) -> Path:
    """A folder whose `chatrlhf/` maps to `repo`'s packages, to put first on PYTHONPATH: a worktree's step 3 then
    imports its own code, not the editable install's."""
    ns = where / "chatrlhf"
    ns.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = ns / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(repo / name, target_is_directory=True)
    return where


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU communication op leaves a 69 MB shared-memory buffer per rank in /dev/shm (host RAM),
    named after MASTER_ADDR and MASTER_PORT, when its processes end: a few runs would fill the memory."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_step3(repo: Path, args, label: str, work: Path, model: str, reward: str) -> dict:
    """Launches step 3 in `repo`, returns the summary of its metrics log (and of the machine during it)."""
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                         text=True).stdout.strip()
    # Each commit tokenises with its own code (this working tree may differ from its HEAD).
    data_cache = cache_dir(args) / ("data-worktree" if repo == REPO else f"data-{sha or 'unknown'}")
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise SystemExit("the deepspeed launcher is not on PATH")
    port = free_port()
    cmd = [sys.executable, launcher, "--num_gpus", str(args.ranks), "--master_port", str(port),
           "training/step3_ppo/main.py", *step3_flags(args, model, reward, out / "run", data_cache)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(shim(repo, work / f"shim-{label}"))] +
                                          ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    busy0, total0 = cpu_times()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    try:
        with open(out / "log.txt", "w") as log:
            proc = subprocess.run(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    finally:
        remove_shm_buffers(port)
    wall = time.time() - start
    busy1, total1 = cpu_times()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-4000:]
        raise SystemExit(f"{label}: step 3 failed ({proc.returncode}); the end of {out / 'log.txt'}:\n{tail}")
    summary = summarize(out / "run" / "metrics.jsonl", args)
    ticks = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    ours = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    summary.update(label=label, commit=sha, wall_s=wall,
                   machine_busy=(busy1 - busy0) / max(total1 - total0, 1),  # share of all cores, every process
                   own_cpu_share=ours / max(wall * cores, 1e-9),
                   others_cores=max((busy1 - busy0) / ticks - ours, 0.0) / max(wall, 1e-9))
    return summary


def summarize(metrics_file: Path, args) -> dict:
    """Mean per step over the steps after the warm-up: split (s), samples/s, answer tokens/s."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = {m["step"]: m for m in records if "time/generation" in m}
    times = {m["step"]: m["time"] for m in records}  # the last record of a step (its evaluation, if any)
    kept = [s for s in sorted(steps) if s > args.warmup and s - 1 in times]
    if not kept:
        raise SystemExit(f"{metrics_file}: no step after the {args.warmup} warm-up steps")
    rows = args.batch_size * args.ranks * (args.samples_per_prompt if args.advantage_estimator not in (None, "gae")
                                           else 1)
    per_step = []
    for s in kept:
        m = steps[s]
        wall = m["time"] - times[s - 1]
        parts = {"generation": m["time/generation"], "scoring": m["time/scoring"], "update": m["time/training"]}
        parts["other"] = max(wall - sum(parts.values()), 0.0)
        per_step.append(dict(wall=wall, tokens=m["ppo/response_length"] * rows, **parts))
    mean = {k: sum(p[k] for p in per_step) / len(per_step) for k in per_step[0]}
    return {"steps": len(per_step), "step_s": mean["wall"], "samples_per_s": rows / mean["wall"],
            "answer_tokens_per_s": mean["tokens"] / mean["wall"],
            "split_s": {k: mean[k] for k in ("generation", "scoring", "update", "other")}, "per_step": per_step}


def describe(s: dict) -> str:
    split = " | ".join(f"{k} {v:6.2f} s" for k, v in s["split_s"].items())
    return (f"{s['label']:>9} {s['commit']:>9}: {s['samples_per_s']:6.3f} samples/s, "
            f"{s['answer_tokens_per_s']:7.1f} answer tokens/s, {s['step_s']:6.2f} s/step ({split}); "
            f"machine busy {s['machine_busy']:.0%}, others using {s['others_cores']:.1f} cores")


# ---- the baseline commit --------------------------------------------------------------------------------
def add_worktree(ref: str, where: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO, capture_output=True,
                         text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--baseline-ref {ref!r}: not a commit of {REPO} ({sha.stderr.strip()})")
    subprocess.run(["git", "worktree", "add", "--detach", str(where), sha.stdout.strip()], cwd=REPO, check=True,
                   capture_output=True)
    return where


def remove_worktree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO, capture_output=True)
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="dschat")
    ap.add_argument("--model", help="the actor (default: the preset's; required by --preset tiny)")
    ap.add_argument("--reward_model", help="critic start and reward (default: --model with a seeded head, cached)")
    ap.add_argument("--ranks", type=int, help="deepspeed --num_gpus")
    ap.add_argument("--threads", type=int, help="torch threads per rank (OMP_NUM_THREADS)")
    ap.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), help="actor and critic")
    ap.add_argument("--dtype", choices=("bf16", "fp32", "fp16", "auto"))
    ap.add_argument("--batch_size", type=int, help="prompts per rank and step")
    ap.add_argument("--max_prompt_seq_len", type=int, help="longer prompts are dropped")
    ap.add_argument("--max_answer_seq_len", type=int)
    ap.add_argument("--steps", type=int, help="PPO steps per run")
    ap.add_argument("--warmup", type=int, help="first steps left out")
    ap.add_argument("--lora_dim", type=int, default=0, help="LoRA rank of actor and critic, base frozen")
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload (optimizer state, ZeRO-3 parameters)")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--advantage_estimator", help="e.g. grpo: --samples_per_prompt answers a prompt, no critic, "
                                                  "no reference (--kl_coef 0)")
    ap.add_argument("--samples_per_prompt", type=int, default=4)
    ap.add_argument("--generation-backend", dest="generation_backend", choices=("hf", "vllm"), default="hf",
                    help="step 3's --generation_backend (vllm: the [vllm] extra, run from its environment)")
    ap.add_argument("--step3-args", dest="step3_args", default="", help="more step-3 flags, passed as they are")
    ap.add_argument("--baseline-ref", dest="baseline_ref", help="time this git ref too, interleaved, and the ratio")
    ap.add_argument("--vs", action="append", default=[], metavar="FLAGS",
                    help="also time this tree with these benchmark flags added (e.g. \"--zero_stage 3\"), "
                         "interleaved with the others, and print its ratio to the plain run; repeatable")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --baseline-ref or --vs: every run, repeated in the same order")
    ap.add_argument("--cache", help="reward model, tokenised data (default: ~/.cache/chatrlhf/bench)")
    ap.add_argument("--output", help="write every figure as JSON here")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        ap.error(f"--preset {args.preset} needs --model")
    if args.warmup >= args.steps:
        ap.error(f"--warmup {args.warmup} leaves none of --steps {args.steps}")
    return args


def describe_workload(args) -> str:
    return (f"{args.model}, {args.ranks} rank(s) x {args.threads} thread(s), ZeRO-{args.zero_stage}, {args.dtype}, "
            f"{args.batch_size} prompts/rank, prompts <= {args.max_prompt_seq_len}, answers <= "
            f"{args.max_answer_seq_len} tokens" + (f", LoRA r={args.lora_dim}" if args.lora_dim else "")
            + (", offload" if args.offload else "") + (", gradient checkpointing" if args.gradient_checkpointing
                                                      else "")
            + (f", {args.advantage_estimator}" if args.advantage_estimator else "")
            + (f", generation {args.generation_backend}" if args.generation_backend != "hf" else "")
            + (f", step 3 {args.step3_args}" if args.step3_args else ""))


def without_vs(argv: list[str]) -> list[str]:
    """argv (after `joined_vs`) less its --vs options: a variant is the base command line plus its own flags."""
    return [a for a in argv if not a.startswith("--vs=")]


def joined_vs(argv: list[str]) -> list[str]:
    """`--vs FLAGS` as `--vs=FLAGS` (and --step3-args): argparse would take a lone "--offload" for an option."""
    from chatrlhf.training.pipeline.cli import attach_flag_values

    return attach_flag_values(argv, ("--vs", "--step3-args"))


def main(argv=None) -> dict:
    argv = joined_vs(list(sys.argv[1:] if argv is None else argv))
    args = parse_args(argv)
    # Arms, each run once a round in this order: the baseline commit, this tree, this tree with each --vs's flags.
    arms = [("current", REPO, args, describe_workload(args))]
    for i, spec in enumerate(args.vs):
        variant = parse_args(without_vs(argv) + shlex.split(spec))
        if variant.preset != args.preset or variant.baseline_ref != args.baseline_ref:
            raise SystemExit(f"--vs {spec!r}: a variant changes settings of the workload, not --preset or "
                             "--baseline-ref")
        arms.append((f"vs{i + 1}", REPO, variant, spec))
    model = args.model
    reward = args.reward_model or str(reward_model(model, cache_dir(args)))
    work = Path(tempfile.mkdtemp(prefix="ppo_bench_"))
    results: dict = {"args": vars(args), "runs": []}
    what = describe_workload(args)
    print(f"== PPO step benchmark: {what}; {args.steps} steps, first {args.warmup} left out ==", flush=True)
    for name, _, variant, spec in arms[1:]:
        print(f"   {name}: {spec!r} -> {describe_workload(variant)}", flush=True)
    baseline = add_worktree(args.baseline_ref, work / "baseline") if args.baseline_ref else None
    if baseline is not None:
        arms.insert(0, ("baseline", baseline, args, args.baseline_ref))
    rounds = args.rounds if len(arms) > 1 else 1
    try:
        for round_ in range(rounds):
            for name, repo, arm_args, _ in arms:
                label = f"{name}{round_}" if name in ("baseline", "current") else f"{name}-{round_}"
                try:
                    s = run_step3(repo, arm_args, label, work, arm_args.model,
                                  arm_args.reward_model or reward)
                except SystemExit as e:  # one failed run (e.g. killed for memory) does not lose the others
                    print(e, flush=True)
                    results.setdefault("failed", []).append({"label": label, "error": str(e)[-2000:]})
                    results["runs"].append({"label": label, "arm": name, "failed": True})
                    continue
                s.update(arm=name, workload=describe_workload(arm_args))
                results["runs"].append(s)
                print(describe(s), flush=True)
    finally:
        if baseline is not None:
            remove_worktree(baseline)
    done = [r for r in results["runs"] if not r.get("failed")]
    if not done:
        raise SystemExit("every run failed")
    of = lambda name: [r for r in results["runs"] if r["arm"] == name]  # noqa: E731
    print(f"\n== {what} ==")
    for name, _, _, spec in arms:
        runs = [r for r in of(name) if not r.get("failed")]
        if not runs:
            continue
        split = {k: sum(r["split_s"][k] for r in runs) / len(runs) for k in runs[0]["split_s"]}
        sps = sum(r["samples_per_s"] for r in runs) / len(runs)
        tps = sum(r["answer_tokens_per_s"] for r in runs) / len(runs)
        results[name] = {"samples_per_s": sps, "answer_tokens_per_s": tps, "split_s": split, "spec": spec}
        print(f"{name:>9} ({runs[0]['commit']}{'' if name in ('baseline', 'current') else ', ' + spec}): "
              f"{sps:.3f} samples/s, {tps:.1f} answer tokens/s, per step: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))

    def ratios(name: str, over: str) -> list[float]:
        """Round by round (the runs next to each other), `name`'s samples/s over `over`'s."""
        return [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(of(name), of(over))
                if not a.get("failed") and not b.get("failed")]

    if "baseline" in results and "current" in results:
        results["ratios"] = ratios("current", "baseline")
        results["ratio"] = results["current"]["samples_per_s"] / results["baseline"]["samples_per_s"]
        print(f"ratio current / {args.baseline_ref}: {results['ratio']:.2f}x samples/s (rounds: "
              + ", ".join(f"{x:.2f}x" for x in results["ratios"]) + ")")
    for name, _, _, spec in arms:
        if name.startswith("vs") and name in results and "current" in results:
            r = results[name]["samples_per_s"] / results["current"]["samples_per_s"]
            results[name].update(ratio=r, ratios=ratios(name, "current"))
            print(f"ratio {spec!r} / current: {r:.2f}x samples/s (rounds: "
                  + ", ".join(f"{x:.2f}x" for x in results[name]["ratios"]) + ")")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
