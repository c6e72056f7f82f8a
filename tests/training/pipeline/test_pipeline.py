"""The one-command pipeline: steps 1 -> 2 -> 3 (and 1 -> DPO with --step2-method dpo) in-process on tiny random
models with the report, skipping of finished steps, --force, options refused before anything starts, a failing
step's message, and the recipes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from chatrlhf.training.pipeline import cli, recipes
from chatrlhf.training.pipeline.cli import PipelineOptions, main, run_pipeline
from chatrlhf.training.pipeline.launch import command
from chatrlhf.training.pipeline.plan import STEPS, PlanError, build_plan
from chatrlhf.utils.config import from_flat

TINY = {  # a few optimizer steps each, short sequences
    1: "--max_steps 2 --max_seq_len 64 --per_device_train_batch_size 4 --per_device_eval_batch_size 8 --eval_iters 1",
    2: "--max_steps 2 --max_seq_len 64 --per_device_train_batch_size 4 --per_device_eval_batch_size 8 --eval_iters 1",
    3: "--max_steps 2 --max_prompt_seq_len 32 --max_answer_seq_len 8 --per_device_generation_batch_size 4 "
       "--per_device_training_batch_size 4 --per_device_eval_batch_size 4 --eval_iters 1",
}


@pytest.fixture(scope="module")
def records(tmp_path_factory, hh_rlhf_sample) -> Path:
    """150 real HH-RLHF pairs as a local file (split 2,4,4 between the steps)."""
    return hh_rlhf_sample(150, tmp_path_factory.mktemp("data"))


def tiny_options(model: Path, out: Path, data: Path, **extra) -> PipelineOptions:
    opts = PipelineOptions(actor_model=str(model), reward_model=str(model), deployment_type="cpu", output_dir=str(out),
                           launcher="inprocess", report_samples=2,
                           common_args=f"--data_path {data} --data_output_path {out.parent / 'cache'} --dtype fp32 "
                                       "--eval_fraction 0.2 --skip_malformed",
                           step1_args=TINY[1], step2_args=TINY[2], step3_args=TINY[3])
    for key, value in extra.items():
        setattr(opts, key, value)
    return opts


@pytest.fixture(scope="module")
def finished(tiny_model_dir, records, tmp_path_factory):
    """One in-process run of the three steps on a tiny llama: (options, result, seconds)."""
    out = tmp_path_factory.mktemp("pipeline") / "output"
    opts = tiny_options(tiny_model_dir("llama"), out, records)
    start = time.time()
    result = run_pipeline(opts)
    return opts, result, time.time() - start


def test_three_steps_run_in_order_and_write_the_report(finished):
    opts, result, _ = finished
    out = Path(opts.output_dir)
    assert sorted(result["steps"]) == [1, 2, 3] and not any(r["skipped"] for r in result["steps"].values())
    for n, name in ((1, "step1_sft"), (2, "step2_reward"), (3, "step3_ppo")):
        done = json.loads((out / name / "pipeline_done.json").read_text())
        assert done["step"] == n and done["wall_time_s"] > 0
        assert (out / "logs" / f"step{n}.log").stat().st_size > 0
    # Step 3 was wired to the outputs of steps 1 and 2.
    step3 = json.loads((out / "step3_ppo" / "pipeline_done.json").read_text())["flags"]
    assert step3["actor_model_name_or_path"] == str(out.resolve() / "step1_sft")
    assert step3["critic_model_name_or_path"] == str(out.resolve() / "step2_reward")
    assert (out / "step3_ppo" / "actor" / "config.json").is_file()
    # Key metrics before -> after, for the summary.
    metrics = result["steps"]
    assert set(metrics[1]["metrics"]) == {"eval/perplexity"}
    assert {"eval/accuracy", "eval/shorter_wins"} <= set(metrics[2]["metrics"])
    # The recipe's --heldout_shares 2: step 2 also scored step 3's share, shown with its standard error.
    assert {"heldout/accuracy", "heldout/accuracy_se", "heldout/shorter_wins"} <= set(metrics[2]["metrics"])
    assert metrics[2]["metrics"]["heldout/pairs"][1] >= 60  # of 150 pairs: share 2's ~60 and step 2's eval split
    assert {"eval/score_mean", "eval/kl", "eval/eos_fraction"} <= set(metrics[3]["metrics"])
    report = (out / "report.md").read_text()
    assert "## Summary" in report and "held-out pairwise accuracy" in report
    accuracy = metrics[2]["metrics"]["heldout/accuracy"][1], metrics[2]["metrics"]["heldout/accuracy_se"][1]
    assert f"pairwise accuracy on those | - | {accuracy[0]:.3f} +- {accuracy[1]:.3f}" in report
    for n in (1, 2, 3):
        png = out / "report" / f"step{n}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(report/step{n}.png)" in report
    # Step 3's own held-out answers, SFT against RLHF, paired: table, plot, samples (2 prompts x 2 models).
    assert "## Held-out answers: SFT against RLHF" in report and "RLHF model (step 3)" in report
    assert "Score gain, prompt by prompt" in report and "At equal length" in report
    assert (out / "report" / "step3_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.count("**score ") == 4
    assert f"--path {out.resolve() / 'step3_ppo' / 'actor'}" in report and report.count("chatbot --path") == 1


@pytest.fixture(scope="module")
def finished_dpo(tiny_model_dir, records, tmp_path_factory):
    """One in-process run of `--step2-method dpo` (SFT then DPO) on a tiny llama: (options, result)."""
    out = tmp_path_factory.mktemp("pipeline_dpo") / "output"
    opts = tiny_options(tiny_model_dir("llama"), out, records, step2_method="dpo", step=None, step3_args="")
    return opts, run_pipeline(opts)


def test_dpo_path_runs_sft_then_dpo_and_reports_it(finished_dpo):
    opts, result = finished_dpo
    out = Path(opts.output_dir)
    assert sorted(result["steps"]) == [1, 2] and opts.step == [1, 2]
    assert not (out / "step2_reward").exists() and not (out / "step3_ppo").exists()
    done = json.loads((out / "step2_dpo" / "pipeline_done.json").read_text())
    assert done["name"] == "step2_dpo" and done["flags"]["model_name_or_path"] == str(out.resolve() / "step1_sft")
    assert (out / "step2_dpo" / "config.json").is_file() and (out / "logs" / "step2.log").stat().st_size > 0
    assert {"eval/accuracy", "eval/logprob_accuracy", "eval/chosen_logprob", "eval/kl_chosen"} == set(
        result["steps"][2]["metrics"])
    report = (out / "report.md").read_text()
    assert "## Step 2: DPO" in report and "(report/step2.png)" in report and "no reward model, no PPO" in report
    assert (out / "report" / "step2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out preference accuracy" in report and "KL to SFT on the chosen answers" in report
    assert "## Sample answers on held-out prompts" in report and "DPO model (step 2)" in report
    assert "**score " not in report  # no reward model on this path
    assert f"--path {out.resolve() / 'step2_dpo'}" in report


def test_dpo_path_refuses_step_3_and_wrong_values(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    base = ["--actor-model", model, "--reward-model", model, "--output-dir", str(tmp_path / "out"),
            "--step2-method", "dpo"]
    assert main(base + ["--step", "1", "2", "3"]) == 2
    assert "--step takes steps from [1, 2] with --step2-method dpo" in capsys.readouterr().err
    assert main(base + ["--step3-args", "--kl_coef 0.1"]) == 2
    assert "there is no step 3 with --step2-method dpo" in capsys.readouterr().err
    assert main(base + ["--step2-args", "--beta 0"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err
    assert main(base + ["--step", "2"]) == 2  # step 1 has not run: nothing to start DPO from
    assert "step 2 starts from step 1's output" in capsys.readouterr().err
    assert main(["--actor-model", model, "--reward-model", model, "--output-dir", str(tmp_path / "out"),
                 "--common-args", "--beta 0.2"]) == 2  # no step of the RLHF path has --beta
    assert "no step has flag(s) ['beta']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--step2-method", "ppo"])
    err = capsys.readouterr().err
    assert "--step2-method: invalid choice: 'ppo'" in err and "dpo" in err
    assert not (tmp_path / "out").exists()


def test_last_block_placeholders_name_the_models_own_blocks():
    summary = {"last_block": "model.layers.29."}
    values = {"a": "{last_block}", "b": "{last_blocks:3}", "c": 4, "d": "{all_blocks}"}
    assert recipes.fill_placeholders(values, summary, "r") == {
        "a": "model.layers.29.", "b": "model.layers.27.,model.layers.28.,model.layers.29.", "c": 4,
        "d": "model.layers."}
    assert recipes.fill_placeholders({"b": "{last_blocks:5}"}, {"last_block": "transformer.h.1."}, "r") == {
        "b": "transformer.h.0.,transformer.h.1."}  # no more blocks than the model has
    with pytest.raises(ValueError, match="needs a model with a list of transformer blocks"):
        recipes.fill_placeholders({"b": "{last_blocks:2}"}, {"last_block": None}, "r")
    with pytest.raises(ValueError, match="needs a model with a list of transformer blocks"):
        recipes.fill_placeholders({"d": "{all_blocks}"}, {"last_block": None}, "r")


def test_dpo_plan_is_wired_to_step_1_and_the_actor(tmp_path):
    summary = {"name": "m", "num_params": 1e8, "last_block": "model.layers.1."}
    opts = PipelineOptions(actor_model="a", reward_model="r", output_dir=str(tmp_path), step2_method="dpo",
                           actor_zero_stage=2, reward_zero_stage=1, common_args="--max_seq_len 64 --beta 0.2",
                           step2_args="--loss_type ipo")
    plan = build_plan(opts, summary, summary, recipes.recipe_dir() / "small_single_gpu.yaml")
    flags = {p.step.name: p.flags for p in plan.steps}
    assert list(flags) == ["step1_sft", "step2_dpo"] and plan.step2_method == "dpo"
    dpo = flags["step2_dpo"]
    assert dpo["model_name_or_path"] == str(tmp_path.resolve() / "step1_sft") and dpo["zero_stage"] == 2
    assert dpo["beta"] == 0.2 and dpo["loss_type"] == "ipo" and dpo["max_seq_len"] == 64
    assert dpo["learning_rate"] == 1e-6 and dpo["output_dir"] == str(tmp_path.resolve() / "step2_dpo")  # recipe
    assert "beta" not in flags["step1_sft"]


def test_finished_steps_are_skipped_and_force_reruns(finished, capsys):
    opts, _, first_run = finished
    out = Path(opts.output_dir)
    lines = {n: (out / name / "metrics.jsonl").read_text() for n, name in ((1, "step1_sft"), (3, "step3_ppo"))}
    start = time.time()
    again = run_pipeline(tiny_options(Path(opts.actor_model), out, Path(opts.common_args.split()[1]),
                                      report_samples=0))
    assert all(r["skipped"] for r in again["steps"].values())
    assert time.time() - start < first_run
    assert (out / "step1_sft" / "metrics.jsonl").read_text() == lines[1]  # no training happened
    printed = capsys.readouterr().out
    assert printed.count("skipped (--force reruns it)") == 3 and "whole command" in printed

    forced = run_pipeline(tiny_options(Path(opts.actor_model), out, Path(opts.common_args.split()[1]),
                                       step=[3], force=True, report_samples=0))
    assert list(forced["steps"]) == [3] and not forced["steps"][3]["skipped"]
    rerun = (out / "step3_ppo" / "metrics.jsonl").read_text()
    assert len(rerun.splitlines()) == len(lines[3].splitlines())  # started over: old metrics were dropped


def test_missing_model_path_is_refused_before_anything_starts(tmp_path, capsys):
    missing = tmp_path / "no" / "such-model"
    code = main(["--actor-model", str(missing), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "no such model folder" in err and "Nothing was run" in err
    assert not (tmp_path / "out").exists()


def test_bad_deployment_type_and_step_list_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--deployment-type", "tpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("single_gpu", "single_node", "multi_node", "cpu"))
    with pytest.raises(SystemExit):
        main(["--step", "4"])
    assert "choose from 1, 2, 3" in capsys.readouterr().err
    assert main(["--step", "3", "1", "--output-dir", str(tmp_path)]) == 2
    assert "increasing order" in capsys.readouterr().err
    # The Python API checks the same things.
    for bad in (dict(deployment_type="tpu"), dict(step=[1, 1]), dict(step=[0, 2]), dict(actor_zero_stage=4)):
        with pytest.raises(PlanError):
            run_pipeline(PipelineOptions(output_dir=str(tmp_path), **bad))
    with pytest.raises(PlanError, match="hostfile"):
        run_pipeline(PipelineOptions(deployment_type="multi_node", output_dir=str(tmp_path)))


def test_bad_overrides_are_refused_before_anything_starts(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    base = ["--actor-model", model, "--reward-model", model, "--output-dir", str(tmp_path / "out")]
    assert main(base + ["--step1-args", "--no_such_flag 1"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err
    assert main(base + ["--step3-args", "--kl_coef lots"]) == 2
    assert "kl_coef" in capsys.readouterr().err
    assert main(base + ["--common-args", "--nope 3"]) == 2
    assert "no step has flag(s) ['nope']" in capsys.readouterr().err
    assert main(base + ["--step", "3"]) == 2  # steps 1 and 2 have not run: nothing to start step 3 from
    assert "add 1 to --step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failing_step_is_named_with_its_log_tail_and_hints(tiny_model_dir, tmp_path, capsys):
    """Subprocess mode (a fresh `python -m` process), failing early on model weights that do not load (what the
    pipeline cannot check beforehand: a missing data file is refused before anything runs)."""
    import shutil

    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    code = main(["--actor-model", str(model), "--reward-model", str(model), "--output-dir", str(tmp_path / "out"),
                 "--deployment-type", "cpu", "--launcher", "python", "--step", "1", "--step1-args", "--dtype fp32"])
    err = capsys.readouterr().err
    assert code == 1
    assert "step 1 (SFT) failed" in err and "exit code" in err
    assert f"last 40 lines of {tmp_path / 'out' / 'logs' / 'step1.log'}" in err
    assert "SafetensorError" in err  # the step's own error, from the log tail
    for hint in ("--per_device_train_batch_size", "ZeRO", "--offload", "--lora_dim", "--gradient_checkpointing"):
        assert hint in err
    assert not (tmp_path / "out" / "step1_sft" / "pipeline_done.json").exists()


# ---- recipes and plans (no training) -------------------------------------------------------------------------
@pytest.mark.parametrize("size, deployment, expected", [
    (135e6, "cpu", "small_cpu"), (360e6, "single_gpu", "small_single_gpu"), (1.2e9, "single_node", "1b_single_node"),
    (6.7e9, "single_gpu", "7b_single_gpu"), (70e9, "multi_node", "7b_multi_node"), (7e9, "cpu", "1b_cpu")])
def test_recipes_are_picked_by_size_and_deployment(size, deployment, expected):
    assert recipes.recipe_path(size, deployment).stem == expected


@pytest.mark.parametrize("method", ["reward", "dpo"])
@pytest.mark.parametrize("recipe", sorted(p.name for p in recipes.recipe_dir().glob("*.yaml")))
def test_every_packaged_recipe_gives_valid_step_configs(recipe, method, tmp_path):
    summary = {"name": "m", "num_params": 1e8, "last_block": "model.layers.1."}
    opts = PipelineOptions(actor_model="m", reward_model="m", output_dir=str(tmp_path), step2_method=method,
                           step=[1, 2, 3] if method == "reward" else [1, 2])
    plan = build_plan(opts, summary, summary, recipes.recipe_dir() / recipe)
    assert [p.step.name for p in plan.steps] == (["step1_sft", "step2_reward", "step3_ppo"] if method == "reward"
                                                 else ["step1_sft", "step2_dpo"])
    assert recipes.describe(recipes.recipe_dir() / recipe)
    for p in plan.steps:
        assert p.flags.get("save_interval", 0) > 0 or p.flags.get("max_steps", 0) > 0  # resumable
        from_flat(p.step.config_class(), p.flags)
        assert "{last_block}" not in json.dumps(p.flags)


def test_overrides_win_and_common_args_go_where_they_fit(tmp_path):
    summary = {"name": "m", "num_params": 1e8, "last_block": "model.layers.1."}
    opts = PipelineOptions(actor_model="a", reward_model="r", output_dir=str(tmp_path), actor_zero_stage=2,
                           reward_zero_stage=1, common_args="--max_seq_len 64 --seed 5",
                           step1_args="--learning_rate 1e-5", step3_args="--critic_model_name_or_path other")
    flags = {p.step.number: p.flags for p in
             build_plan(opts, summary, summary, recipes.recipe_dir() / "small_single_gpu.yaml").steps}
    assert flags[1]["learning_rate"] == 1e-5 and flags[1]["zero_stage"] == 2 and flags[2]["zero_stage"] == 1
    assert flags[1]["max_seq_len"] == flags[2]["max_seq_len"] == 64 and "max_seq_len" not in flags[3]
    assert flags[3]["seed"] == 5 and flags[3]["actor_zero_stage"] == 2 and flags[3]["critic_zero_stage"] == 1
    assert flags[3]["actor_model_name_or_path"] == str(tmp_path.resolve() / "step1_sft")
    assert flags[3]["critic_model_name_or_path"] == "other"


def test_model_size_comes_from_the_config(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    summary = recipes.model_summary(str(path))
    assert summary["num_params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    assert summary["last_block"] == "model.layers.1."
    assert recipes.model_summary(str(tiny_model_dir("gpt2", chat_template=False)))["last_block"] == "transformer.h.1."


def test_local_looking_names():
    for name in ("./m", "/abs/m", "~/m", "a/b/c", "out/"):
        assert recipes.looks_local(name), name
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"):
        assert not recipes.looks_local(name), name


def test_launch_commands_per_deployment(tmp_path):
    summary = {"name": "m", "num_params": 1e8, "last_block": "model.layers.1."}
    plan = build_plan(PipelineOptions(actor_model="m", reward_model="m", output_dir=str(tmp_path)), summary, summary,
                      recipes.recipe_dir() / "small_single_gpu.yaml").steps[0]
    one = command(plan, "single_gpu", "deepspeed")
    assert one[one.index("--num_gpus") + 1] == "1"
    assert one[-4:] == ["--module", STEPS["step1_sft"].module, "--config", str(plan.args_file)]
    multi = command(plan, "multi_node", "deepspeed", hostfile="hosts")
    assert multi[multi.index("--hostfile") + 1] == "hosts" and "--num_gpus" not in multi
    assert "--num_gpus" not in command(plan, "single_node", "deepspeed")  # all local GPUs
    assert command(plan, "cpu", "python")[1:3] == ["-m", STEPS["step1_sft"].module]
    assert cli.launcher_for("cpu", "auto", None) == "python" and cli.launcher_for("single_gpu", "auto", None) == \
        "deepspeed"


def test_step_args_take_a_lone_flag_and_the_command_is_recorded():
    opts = cli.parse_options(["--step1-args", "--offload", "--force", "--common-args", "--seed 3"])
    assert opts.step1_args == "--offload" and opts.force and opts.common_args == "--seed 3"
    assert opts.command.startswith("chatrlhf-train --step1-args --offload")


def test_sigterm_stops_the_running_step_process(tmp_path):
    """A pipeline killed with SIGTERM (a job scheduler, `timeout`) must not leave its step running behind it."""
    import os
    import signal
    import sys
    import threading

    from chatrlhf.training.pipeline.launch import _run_subprocess
    from chatrlhf.training.pipeline.plan import StepPlan

    plan = StepPlan(STEPS["step1_sft"], tmp_path / "out", {}, tmp_path / "step1.log", tmp_path / "step1.yaml")
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('up', flush=True); " \
            "time.sleep(60)"

    def terminate_when_up():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_up, daemon=True).start()
    start = time.time()
    with pytest.raises(SystemExit) as stopped:
        _run_subprocess(plan, [sys.executable, "-c", child], start, {})
    assert stopped.value.code == 128 + signal.SIGTERM
    assert time.time() - start < 30
    with pytest.raises(ProcessLookupError):  # the step's process is gone (terminated and reaped)
        os.kill(int(pid_file.read_text()), 0)
    assert "up" in plan.log.read_text()


def test_cpu_threads_count_the_cores_idle_now(monkeypatch):
    """One-process CPU steps get the cores that are idle at launch, not those the 1-minute load average (still
    counting the `pip install` before `python train.py`) leaves."""
    from chatrlhf.training.pipeline import launch

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # what a just-finished install leaves
    samples = iter([(1000, 5000), (1000, 5100)])  # (busy, total) jiffies: nothing ran between the two reads
    monkeypatch.setattr(launch, "_cpu_jiffies", lambda: next(samples))
    assert launch.cpu_threads(interval=0) == 2
    samples = iter([(1000, 5000), (1050, 5100)])  # one of the two cores busy
    monkeypatch.setattr(launch, "_cpu_jiffies", lambda: next(samples))
    assert launch.cpu_threads(interval=0) == 1

    def no_proc():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(launch, "_cpu_jiffies", no_proc)  # elsewhere: the load average
    assert launch.cpu_threads(interval=0) == 1
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert launch.cpu_threads(interval=0) == 2
