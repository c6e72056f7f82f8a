"""One command for the three steps: `python train.py` / `chatrlhf-train` (DeepSpeed-Chat's e2e_rlhf.py, fixed).

  python train.py                                    # the embedded default: SmolLM2-135M-Instruct, bundled HH-RLHF
  python train.py --actor-model meta-llama/Llama-3.2-1B --reward-model HuggingFaceTB/SmolLM2-360M \\
      --deployment-type single_node --actor-zero-stage 3 --step1-args "--learning_rate 1e-5 --max_seq_len 1024"
  python train.py --deployment-type multi_node --hostfile hostfile --actor-model Qwen/Qwen2.5-7B ...
  python train.py --step 3 --force --step3-args "--ppo_epochs 2"   # rerun PPO on the existing step 1-2 outputs
  python train.py --step2-method dpo                 # SFT, then DPO on the preference pairs: no reward model, no PPO

Each chosen step runs in a fresh process (`deepspeed` launcher on GPUs, `python -m` on CPU) with flags from a
recipe (picked by the actor's size and the deployment type; `recipes/`), the wiring between steps, and your
`--common-args` / `--stepN-args`, which win. Wrong options are refused before anything starts. Finished steps
are skipped (their `pipeline_done.json`) unless `--force`; an interrupted step resumes from its checkpoint.
`run_pipeline(PipelineOptions(...))` is the Python API (tests use `launcher="inprocess"`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Optional

from chatrlhf.training.pipeline import preflight, recipes
from chatrlhf.training.pipeline.launch import (LAUNCHERS, StepFailed, command, cpu_threads, launcher_for, mark_done,
                                               run_step)
from chatrlhf.training.pipeline.plan import STEP2_METHODS, STEPS, PlanError, build_plan
from chatrlhf.training.pipeline.report import duration, format_table, key_metrics, summary_rows, write_report
from chatrlhf.utils import lock
from chatrlhf.utils.config import field_docs
from chatrlhf.utils.smollm2 import DEFAULT_MODEL_NAME

PROG = "chatrlhf-train"
FLAG_OPTIONS = ("--common-args", "--step1-args", "--step2-args", "--step3-args")


@dataclass
class PipelineOptions:
    """The pipeline's own options (each step's flags go through common_args / stepN_args or the recipe).

    The command line is derived from this class (`build_parser`): each field is a `--dashed-name` flag whose help
    is the field's docstring, so a default is written once, here."""

    actor_model: str = DEFAULT_MODEL_NAME
    """Hugging Face causal LM (hub id or local folder) trained by steps 1 and 3 (or 1 and DPO)"""
    reward_model: str = DEFAULT_MODEL_NAME
    """model the reward model and the critic start from in step 2; must share the actor's tokenizer"""
    deployment_type: Optional[str] = None
    """where to run (default: cpu without an accelerator, else single_gpu)"""
    step: Optional[list[int]] = None
    """steps to run, in increasing order (default: all of them: 1 2 3, or 1 2 with --step2-method dpo)"""
    step2_method: str = "reward"
    """what step 2 is: reward (a reward model, then PPO as step 3) or dpo (DPO trains the SFT model on the
    preference pairs directly: no reward model and no PPO)"""
    output_dir: str = "./output"
    """root of step1_sft/, step2_reward/ (or step2_dpo/), step3_ppo/, logs/ and report.md"""
    actor_zero_stage: Optional[int] = None
    """ZeRO stage of the actor (steps 1 and 3); default: the recipe's"""
    reward_zero_stage: Optional[int] = None
    """ZeRO stage of the reward model and critic (steps 2 and 3); default: the recipe's"""
    force: bool = False
    """rerun the chosen steps from scratch even when done (drops their checkpoints and metrics)"""
    hostfile: Optional[str] = None
    """DeepSpeed hostfile for multi_node (one `host slots=N` line per node); default: DeepSpeed's /job/hostfile
    when it exists"""
    no_ssh: bool = False
    """multi_node without ssh (DeepSpeed's --no_ssh): run this same command on every node, each with its
    --node-rank, all with --master-addr"""
    node_rank: int = 0
    """with --no-ssh: this node's line in the hostfile, from 0 (node 0 writes the report)"""
    master_addr: Optional[str] = None
    """with --no-ssh: the address of node 0, which every node can reach"""
    master_port: Optional[int] = None
    """with --no-ssh: the port on node 0 the ranks meet at (default: DeepSpeed's 29500)"""
    num_gpus: Optional[int] = None
    """GPUs per node for single_node/multi_node (default: all); CPU ranks for cpu (default: 1)"""
    recipe: Optional[str] = None
    """a recipe YAML file, or the name of a packaged one (e.g. small_single_gpu); default: picked by the actor's
    size and --deployment-type"""
    common_args: str = ""
    """flags given to every step that has them"""
    step1_args: str = ""
    """flags for step 1 (SFT), as on its command line; they win over the recipe"""
    step2_args: str = ""
    """flags for step 2 (reward model, or DPO with --step2-method dpo), as on its command line; they win over the
    recipe"""
    step3_args: str = ""
    """flags for step 3 (PPO), as on its command line; they win over the recipe"""
    launcher: str = "auto"
    """advanced: how steps start (auto: deepspeed on GPUs, python -m on CPU; inprocess: run(config) in this
    process)"""
    report_samples: int = 8
    """held-out prompts whose SFT and final (RLHF or DPO) answers the report shows side by side (0: none); after
    step 3 they are the evaluation's own answers, sampled as it sampled them"""
    dry_run: bool = False
    """check everything and print the commands; run nothing"""
    command: str = ""
    """the command line as typed, shown in the report (set by parse_options, not a flag)"""


NOT_FLAGS = ("command",)
CHOICES = {"deployment_type": recipes.DEPLOYMENTS, "step": sorted({s.number for s in STEPS.values()}),
           "step2_method": tuple(STEP2_METHODS), "launcher": LAUNCHERS}
# DeepSpeed-Chat's e2e_rlhf.py: an OPT size stands for facebook/opt-<size>; "" as a ZeRO stage is the script's own.
OPT_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")
DEFAULT_HOSTFILE = "/job/hostfile"  # what the deepspeed launcher reads without --hostfile (DLTS_HOSTFILE)


def _zero_stage(text: str) -> int | None:
    """--actor-zero-stage / --reward-zero-stage: 0-3, or "" (DeepSpeed-Chat's default) for the recipe's."""
    if text.strip() == "":
        return None
    if text.strip() not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 0, 1, 2, 3, or '' for the recipe's)")
    return int(text)


def opt_model(name: str) -> str:
    """DeepSpeed-Chat's size shorthand: `1.3b` -> `facebook/opt-1.3b` (an existing folder of that name wins)."""
    return f"facebook/opt-{name}" if name.lower() in OPT_SIZES and not Path(name).exists() else name


# What DeepSpeed-Chat's e2e_rlhf.py runs when a flag is left out (e2e_rlhf.py here keeps these; train.py has ours).
E2E_DEFAULTS = {"--actor-model": "1.3b", "--reward-model": "350m", "--deployment-type": "single_gpu"}


def e2e_argv(argv: list[str]) -> list[str]:
    """e2e_rlhf.py's command line for the pipeline: DeepSpeed-Chat's defaults for the options it leaves out."""
    given = {a.split("=")[0] for a in argv}
    return [w for flag, value in E2E_DEFAULTS.items() if flag not in given for w in (flag, value)] + list(argv)


def dschat_size(name: str) -> str | None:
    """The OPT size DeepSpeed-Chat names output folders by (`facebook/opt-1.3b` -> `1.3b`), else None."""
    size = name.lower().removeprefix("facebook/opt-")
    return size if size in OPT_SIZES else None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of PipelineOptions: one flag per field, typed by its annotation."""
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs step 1 (SFT), step 2 (reward model) and step 3 (PPO with a critic) in order; with "
                    "--step2-method dpo, step 1 (SFT) then step 2 (DPO).",
        epilog="Override any value of a step with its own flag names (see `python -m chatrlhf.training.step1_sft "
               "--help`, step2_reward, step2_dpo, step3_ppo):\n  --step1-args \"--learning_rate 1e-5 --max_seq_len 256\"\n"
               "  --step3-args \"--actor_lora_dim 8 --kl_coef 0.1\"\n  --common-args \"--data_path my.jsonl "
               "--dtype bf16\"   (each step takes the flags it has)\nRecipes: " + str(recipes.recipe_dir()))
    docs, hints = field_docs(PipelineOptions), typing.get_type_hints(PipelineOptions)
    for f in fields(PipelineOptions):
        if f.name in NOT_FLAGS:
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union:  # Optional[X] -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        shown = "" if default in (None, "", False) else f" (default: {' '.join(map(str, default))})" if isinstance(
            default, list) else " (default: %(default)s)"
        kwargs = {"default": default, "help": docs[f.name].replace("%", "%%") + shown}
        if tp is bool:
            kwargs["action"] = "store_true"
        elif f.name in ("actor_zero_stage", "reward_zero_stage"):
            kwargs.update(type=_zero_stage, metavar="{0,1,2,3}")
        elif typing.get_origin(tp) is list:
            kwargs.update(nargs="+", type=typing.get_args(tp)[0])
        else:
            kwargs["type"] = tp
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if f.name.endswith("_args"):
            kwargs["metavar"] = "FLAGS"
        p.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return p


def attach_flag_values(argv: list[str], options=FLAG_OPTIONS) -> list[str]:
    """`--step1-args --offload` -> `--step1-args=--offload` for each of `options` (options whose value is a
    command line of flags): argparse would take a lone `--offload` for an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_options(argv: list[str] | None = None) -> PipelineOptions:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_parser().parse_args(attach_flag_values(argv)))
    opts = PipelineOptions(**{f.name: args[f.name] for f in fields(PipelineOptions) if f.name in args})
    opts.actor_model, opts.reward_model = opt_model(opts.actor_model), opt_model(opts.reward_model)
    prog = f"python {Path(sys.argv[0]).name}" if Path(sys.argv[0]).name in ("train.py", "e2e_rlhf.py") else PROG
    opts.command = " ".join([prog] + [shlex.quote(a) for a in argv])
    return opts


def default_deployment() -> str:
    from chatrlhf.utils.distributed import accelerator

    return "cpu" if accelerator().device_name() == "cpu" else "single_gpu"


def check_options(opts: PipelineOptions) -> None:
    """Refuses wrong values before anything starts (argparse checks choices; the Python API comes here too)."""
    if opts.deployment_type not in (None,) + recipes.DEPLOYMENTS:
        raise PlanError(f"unknown deployment type {opts.deployment_type!r}; accepted: {', '.join(recipes.DEPLOYMENTS)}")
    if opts.step2_method not in STEP2_METHODS:
        raise PlanError(f"--step2-method must be one of {', '.join(STEP2_METHODS)}, got {opts.step2_method!r}")
    path = list(STEP2_METHODS[opts.step2_method])
    if opts.step is None:
        opts.step = path
    steps = list(opts.step)
    if not steps or any(s not in path for s in steps) or steps != sorted(set(steps)):
        with_method = "" if opts.step2_method == "reward" else f" with --step2-method {opts.step2_method}"
        raise PlanError(f"--step takes steps from {path}{with_method} in increasing order without repeats "
                        f"(e.g. --step {' '.join(map(str, path))}, --step {' '.join(map(str, path[1:]))}), got "
                        f"{' '.join(map(str, steps)) or 'nothing'}")
    for name in ("actor_zero_stage", "reward_zero_stage"):
        if getattr(opts, name) not in (None, 0, 1, 2, 3):
            raise PlanError(f"--{name.replace('_', '-')} must be 0, 1, 2 or 3, got {getattr(opts, name)}")
    if opts.launcher not in LAUNCHERS:
        raise PlanError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {opts.launcher!r}")
    if opts.num_gpus is not None and opts.num_gpus < 1:
        raise PlanError(f"--num-gpus must be >= 1, got {opts.num_gpus}")
    if opts.deployment_type == "multi_node":
        if not opts.hostfile:
            raise PlanError("multi_node needs --hostfile (one `hostname slots=N` line per node; see "
                            f"applications/hostfile.example), or DeepSpeed's default {DEFAULT_HOSTFILE}, which is "
                            "not on this machine")
        if not Path(opts.hostfile).is_file():
            raise PlanError(f"--hostfile: no such file {opts.hostfile}")
    if opts.no_ssh:
        if opts.deployment_type != "multi_node":
            raise PlanError("--no-ssh is for --deployment-type multi_node")
        if not opts.master_addr:
            raise PlanError("--no-ssh needs --master-addr, the address of node 0 (with ssh DeepSpeed asks node 0)")
        if opts.node_rank < 0:
            raise PlanError(f"--node-rank must be >= 0, got {opts.node_rank}")
    elif opts.node_rank or opts.master_addr or opts.master_port:
        raise PlanError("--node-rank, --master-addr and --master-port go with --no-ssh")
    for option in ("actor_model", "reward_model"):
        name = getattr(opts, option)
        path = Path(name).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise PlanError(f"--{option.replace('_', '-')} {name}: the folder has no config.json (not a saved "
                            "Hugging Face model)")
        if not path.exists() and recipes.looks_local(name):
            raise PlanError(f"--{option.replace('_', '-')} {name}: no such model folder (a local path; a hub id "
                            f"looks like `org/name`; the default is `{DEFAULT_MODEL_NAME}`)")


def _recipe_file(opts: PipelineOptions, num_params: float, deployment: str) -> Path:
    if not opts.recipe:
        return recipes.recipe_path(num_params, deployment)
    path = Path(opts.recipe)
    packaged = recipes.recipe_dir() / f"{opts.recipe}.yaml"
    if not path.is_file() and packaged.is_file():
        return packaged
    if not path.is_file():
        names = sorted(p.stem for p in recipes.recipe_dir().glob("*.yaml"))
        raise PlanError(f"--recipe {opts.recipe}: no such file, and no packaged recipe of that name "
                        f"(packaged: {', '.join(names)})")
    return path


def dschat_defaults(opts: PipelineOptions) -> None:
    """What DeepSpeed-Chat's e2e_rlhf.py fills in: OPT sizes as model names, DeepSpeed's default hostfile."""
    opts.actor_model, opts.reward_model = opt_model(opts.actor_model), opt_model(opts.reward_model)
    if opts.deployment_type == "multi_node" and not opts.hostfile and Path(DEFAULT_HOSTFILE).is_file():
        opts.hostfile = DEFAULT_HOSTFILE


def dschat_inputs(opts: PipelineOptions) -> list[str]:
    """`--step 3` without steps 1 or 2 on an output folder laid out by DeepSpeed-Chat's e2e_rlhf.py
    (`actor-models/<size>`, `reward-models/<size>`) and not by chatrlhf: start step 3 from those models.
    Adds them to opts.step3_args; returns what was used."""
    out = Path(opts.output_dir).expanduser()
    used = []
    for n, ours, theirs, name, flag in ((1, "step1_sft", "actor-models", opts.actor_model, "actor_model_name_or_path"),
                                        (2, "step2_reward", "reward-models", opts.reward_model,
                                         "critic_model_name_or_path")):
        steps = opts.step if opts.step is not None else [1, 2, 3]
        if 3 not in steps or n in steps or f"--{flag}" in opts.step3_args:
            continue
        if (out / ours / "config.json").is_file():
            continue
        size = dschat_size(name)
        found = [out / theirs / size] if size else sorted(p for p in (out / theirs).glob("*") if p.is_dir())
        if len(found) == 1 and (found[0] / "config.json").is_file():
            opts.step3_args = f"{opts.step3_args} --{flag} {shlex.quote(str(found[0]))}".strip()
            used.append(str(found[0]))
    return used


def prepare(opts: PipelineOptions):
    """Checks everything and returns (plan, deployment, launcher); raises PlanError."""
    dschat_defaults(opts)
    check_options(opts)
    for path in dschat_inputs(opts):
        say(f"step 3 starts from DeepSpeed-Chat's output layout: {path}")
    deployment = opts.deployment_type or default_deployment()
    summaries = {}
    for option in ("actor_model", "reward_model"):
        name = getattr(opts, option)
        if name not in summaries:
            try:
                summaries[name] = recipes.model_summary(name)
            except OSError as e:
                raise PlanError(f"--{option.replace('_', '-')}: {e}") from None
    actor, reward = summaries[opts.actor_model], summaries[opts.reward_model]
    recipe = _recipe_file(opts, actor["num_params"], deployment)
    try:
        plan = build_plan(opts, actor, reward, recipe)
    except (ValueError, OSError) as e:
        raise PlanError(str(e)) from None
    # Models, tokenizers, data, resumes, output folder, disk and memory: all before step 1 (PlanError lists all).
    for note in preflight.run_all(plan, opts, deployment).notes:
        say(note)
    return plan, deployment, launcher_for(deployment, opts.launcher, opts.num_gpus)


def say(message: str) -> None:
    print(f"[{PROG}] {message}", flush=True)


def run_pipeline(opts: PipelineOptions) -> dict:
    """Runs the chosen steps; returns {"steps": {n: {"wall_time_s", "skipped", "metrics"}}, "report": path}.
    Raises PlanError (nothing started) or StepFailed."""
    began = time.time()
    plan, deployment, launcher = prepare(opts)
    second = ("step 2 DPO (no reward model, no PPO)" if opts.step2_method == "dpo" else
              f"reward model {opts.reward_model} ({recipes.human_size(plan.reward['num_params'])})")
    say(f"actor {opts.actor_model} ({recipes.human_size(plan.actor['num_params'])}), {second}; {deployment}; "
        f"recipe {plan.recipe}")
    no_ssh = ["--no_ssh", "--node_rank", str(opts.node_rank), "--master_addr", opts.master_addr] + (
        ["--master_port", str(opts.master_port)] if opts.master_port else []) if opts.no_ssh else []
    cmds = {p.step.number: None if launcher == "inprocess" else
            command(p, deployment, launcher, num_gpus=opts.num_gpus, hostfile=opts.hostfile, launcher_args=no_ssh)
            for p in plan.steps}
    if opts.dry_run:
        for p in plan.steps:
            say(f"step {p.step.number} ({p.step.title}) -> {p.output_dir}\n    "
                + (" ".join(map(shlex.quote, cmds[p.step.number])) if cmds[p.step.number] else "in-process")
                + f"\n    with {p.args_file} (not written by --dry-run): {p.flags}")
        return {"steps": {}, "report": None, "plan": plan}
    try:  # held until this process ends (however it ends): one pipeline per output root (node 0's, with --no-ssh)
        if not opts.node_rank:
            lock.acquire(plan.output_dir, preflight.PIPELINE_LOCK, what="pipeline run")
    except lock.DirectoryLocked as e:
        raise PlanError(str(e)) from None

    env = {}
    if launcher == "python" and deployment == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(cpu_threads())
        say(f"{env['OMP_NUM_THREADS']} thread(s) per step: the idle cores of this machine (set OMP_NUM_THREADS "
            "to choose)")
    results: dict[int, dict] = {}
    reran = False
    for p in plan.steps:
        n = p.step.number
        done = p.done_record()
        if done and not opts.force:
            say(f"step {n} ({p.step.title}): done earlier ({p.done_file}); skipped (--force reruns it)")
            if done.get("flags") != p.flags:
                say(f"  note: step {n} was run with other flags than now; --force reruns it with the new ones")
            if reran:
                say(f"  note: an earlier step was rerun; step {n} still holds results built from its old output")
            results[n] = {"wall_time_s": done.get("wall_time_s"), "skipped": True,
                          "metrics": key_metrics(p.step.name, p.output_dir)}
            continue
        if opts.force:
            _clear(p)
        elif (p.output_dir / "checkpoints" / "latest").is_file():
            say(f"step {n} ({p.step.title}): not finished earlier; resuming from {p.output_dir / 'checkpoints'}")
        say(f"step {n} ({p.step.title}) -> {p.output_dir}; log {p.log}")
        wall = run_step(p, cmds[n], env)
        metrics = key_metrics(p.step.name, p.output_dir)
        mark_done(p, wall, metrics)
        results[n] = {"wall_time_s": wall, "skipped": False, "metrics": metrics}
        reran = True
        say(f"step {n} ({p.step.title}) done in {wall:.0f} s")

    if opts.node_rank > 0:
        say(f"node {opts.node_rank} done; node 0 writes the report")
        return {"steps": results, "report": None, "plan": plan}
    start = time.time()
    # Results depend on the thread count (the order of floating-point sums), so the summary names it.
    threads = env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    with _threads(threads):
        report = write_report(plan, results, command=opts.command or "run_pipeline(...)", deployment=deployment,
                              samples=opts.report_samples, threads=int(threads) if threads else None)
    say(f"report written in {time.time() - start:.0f} s: {report}")
    extra = [["report", duration(time.time() - start), "", "", ""],
             ["whole command", duration(time.time() - began),
              f"{threads} thread(s) per step: a rerun with as many gives the same figures" if threads else "", "", ""]]
    print("\n" + format_table(summary_rows(plan, results) + extra) + "\n", flush=True)
    return {"steps": results, "report": report, "plan": plan}


@contextlib.contextmanager
def _threads(n: str | None):
    """This process's torch threads for the report's sample answers (as the steps had)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _clear(p) -> None:
    """--force: the step's done marker, metrics and checkpoints go (models are overwritten by the run)."""
    import shutil

    for name in ("pipeline_done.json", "metrics.jsonl"):
        (p.output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(p.output_dir / "checkpoints", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    try:
        run_pipeline(opts)
    except PlanError as e:
        print(f"{PROG}: error: {e}\nNothing was run.", file=sys.stderr, flush=True)
        return 2
    except StepFailed as e:
        print(f"\n{PROG}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
