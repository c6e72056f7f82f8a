"""Runs that go wrong stop and say why: non-finite losses, gradient norms, scores and weights stop the run at the
step they appear with the learning rate and a hint, keep the last good checkpoint, save no model and exit non-zero;
bad flag values are refused at parse time, an empty training split before anything is built."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf.training import checkpoint
from chatrlhf.training.step1_sft import main as sft_main
from chatrlhf.training.step1_sft.config import SFTConfig
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.utils.config import from_flat, parse_config
from chatrlhf.utils.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records(tmp_path_factory, hh_rlhf_sample):
    return hh_rlhf_sample(48, tmp_path_factory.mktemp("data"))


def sft_flags(model_dir, out, data, cache, **extra) -> dict:
    flags = dict(model_name_or_path=str(model_dir), data_path=[str(data)], data_split="10,0,0", dtype="fp32",
                 output_dir=str(out), data_output_path=str(cache), max_seq_len=64, per_device_train_batch_size=4,
                 per_device_eval_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant", eval_iters=2,
                 seed=7, skip_malformed=True)
    flags.update(extra)
    return flags


def argv(flags: dict) -> list[str]:
    out = []
    for k, v in flags.items():
        out += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    return out


# ---- the guards themselves ------------------------------------------------------------------------------------
def test_non_finite_metrics_name_step_quantity_learning_rate_and_hint(tmp_path):
    from chatrlhf.training import guards

    guards.check_metrics({"train/loss": 2.0, "train/lr": 1e-3, "note": "text"}, step=3)  # finite: nothing
    with pytest.raises(guards.NonFiniteError) as e:
        guards.check_metrics({"train/loss": float("nan"), "train/grad_norm": float("inf")}, step=7,
                             lrs={"--learning_rate": 0.5}, output_dir=tmp_path)
    message = str(e.value)
    assert e.value.step == 7 and e.value.quantity == "train/loss"
    for part in ("step 7", "train/loss is nan", "also train/grad_norm", "--learning_rate 0.5", "Lower the learning",
                 "no checkpoint had been written yet"):
        assert part in message, (part, message)
    with pytest.raises(guards.NonFiniteError, match="reward"):  # a NaN score points at the reward, not the lr
        guards.check_metrics({"eval/score_mean": float("nan")}, step=0)


def test_tensor_checks_skip_padding_and_weight_checks_name_the_tensor():
    from chatrlhf.training import guards

    logprobs = torch.tensor([[-1.0, float("nan")], [-2.0, -3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # the NaN sits after the EOS: padding
    guards.check_tensors({"logprobs": (logprobs, mask), "scores": torch.tensor([0.1, 0.2])}, step=1)
    with pytest.raises(guards.NonFiniteError, match="scores hold NaN or inf"):
        guards.check_tensors({"logprobs": (logprobs, mask), "scores": torch.tensor([0.1, float("inf")])}, step=1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    guards.check_weights({"model": model}, step=1)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(guards.NonFiniteError, match=r"weights of model hold NaN or inf .*1\.weight"):
        guards.check_weights({"model": model}, step=4)


def test_a_run_that_learns_nothing_draws_a_warning():
    from chatrlhf.training import guards

    stuck = guards.RunHealth(chance_loss=math.log(512))
    for _ in range(12):
        stuck.observe({"train/loss": math.log(512) + 0.01, "train/accuracy": 0.0})
    warnings = stuck.warnings()
    assert len(warnings) == 2 and "learned nothing" in warnings[0] and "train/accuracy was 0" in warnings[1]
    learning = guards.RunHealth(chance_loss=math.log(512))
    for i in range(12):
        learning.observe({"train/loss": math.log(512) - 0.2 * i, "train/accuracy": 0.5})
    assert learning.warnings() == []
    short = guards.RunHealth(chance_loss=math.log(512))  # a two-step smoke run is no evidence either way
    short.observe({"train/loss": math.log(512)})
    assert short.warnings() == []


# ---- bad input, refused before training --------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("learning_rate", "-1"), ("learning_rate", "inf"),
                                         ("per_device_train_batch_size", "0"), ("gradient_clipping", "-1"),
                                         ("num_train_epochs", "0"), ("log_interval", "0"), ("hang_timeout", "-5")])
def test_bad_values_are_refused_at_parse_time_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(SFTConfig, [f"--{flag}", value])
    assert e.value.code == 2 and f"--{flag}" in capsys.readouterr().err


def test_step3_batch_sizes_of_zero_are_refused_naming_the_flag():
    for flag in ("per_device_training_batch_size", "per_device_generation_batch_size", "actor_learning_rate"):
        with pytest.raises(ValueError, match=f"--{flag}"):
            from_flat(PPOConfig, {flag: 0 if "batch" in flag else -1.0})


def test_an_empty_training_split_is_refused_before_anything_is_built(tiny_model_dir, records, tmp_path, monkeypatch):
    from chatrlhf.training.step1_sft import main as step1

    built = []
    monkeypatch.setattr(step1, "build_trained_model", lambda *a, **k: built.append(1))
    out = tmp_path / "empty"
    with pytest.raises(ValueError, match="no training examples.*--data_split"):
        sft_main.run(from_flat(SFTConfig, sft_flags(tiny_model_dir("llama"), out, records, tmp_path / "c",
                                                    data_split="0,10,0")))
    assert not built and not (out / "model.safetensors").exists()


# ---- divergence ----------------------------------------------------------------------------------------------------
def test_divergence_stops_the_run_keeps_the_last_good_checkpoint_and_exits_non_zero(tiny_model_dir, records,
                                                                                   tmp_path):
    out = tmp_path / "diverged"
    flags = sft_flags(tiny_model_dir("llama"), out, records, tmp_path / "c", learning_rate=1e30, max_steps=6,
                      save_interval=1)
    # Without this process's own process-group variables (an in-process test may have set them).
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "chatrlhf.training.step1_sft", *argv(flags)], capture_output=True,
                          text=True, timeout=600, env=env)
    tail = proc.stderr[-3000:]
    assert proc.returncode != 0, tail
    assert "NonFiniteError: step 2:" in proc.stderr and "--learning_rate 1e+30" in proc.stderr, tail
    assert "Lower the learning rate" in proc.stderr and "checkpoints/step_1, is kept" in proc.stderr, tail
    assert not (out / "model.safetensors").exists()  # no final model from a non-finite state
    assert checkpoint.latest(out).name == "step_1"
    logged = [m for m in read_metrics(out) if "train/loss" in m]
    assert [m["step"] for m in logged] == [1, 2]  # it stopped at the step it diverged, not five steps later


def test_the_pipeline_names_the_step_that_diverged(tiny_model_dir, records, tmp_path):
    from chatrlhf.training.pipeline.cli import PipelineOptions, run_pipeline
    from chatrlhf.training.pipeline.launch import StepFailed

    model = str(tiny_model_dir("llama"))
    out = tmp_path / "pipeline"
    opts = PipelineOptions(actor_model=model, reward_model=model, deployment_type="cpu", output_dir=str(out),
                           launcher="inprocess", report_samples=0,
                           common_args=f"--data_path {records} --data_output_path {tmp_path / 'cache'} --dtype fp32 "
                                       "--skip_malformed --max_seq_len 64 --per_device_train_batch_size 4",
                           step1_args="--learning_rate 1e30 --lora_learning_rate 1e30 --max_steps 4")
    with pytest.raises(StepFailed) as e:
        run_pipeline(opts)
    message = str(e.value)
    assert "step 1 (SFT) failed" in message and "NonFiniteError" in message and "1e+30" in message
    assert not (out / "step1_sft" / "pipeline_done.json").exists()
    assert not (out / "step2_reward").exists()  # nothing after the failing step ran


def _nan_model(src: Path, dst: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _ppo_flags(actor, critic, out, data, cache, **extra) -> dict:
    flags = dict(actor_model_name_or_path=str(actor), critic_model_name_or_path=str(critic), data_path=[str(data)],
                 data_split="0,0,1", eval_fraction=0.25, dtype="fp32", output_dir=str(out),
                 data_output_path=str(cache), max_prompt_seq_len=16, max_answer_seq_len=4,
                 per_device_generation_batch_size=4, per_device_training_batch_size=4, per_device_eval_batch_size=4,
                 max_steps=2, eval_iters=1, seed=5)
    flags.update(extra)
    return flags


def test_step3_from_a_nan_actor_says_the_model_is_broken(tiny_model_dir, records, tmp_path):
    from chatrlhf.training.step3_ppo import main as ppo_main

    good = tiny_model_dir("llama")
    broken = _nan_model(good, tmp_path / "nan_actor")
    cfg = from_flat(PPOConfig, _ppo_flags(broken, good, tmp_path / "ppo", records, tmp_path / "c"))
    with pytest.raises(Exception) as e:
        ppo_main.run(cfg, reward_fn=lambda prompts, responses: [0.0] * len(responses))
    message = str(e.value)
    assert type(e.value).__name__ == "NonFiniteError", message  # not torch's "probability tensor contains ..."
    assert "before training" in message and "weights of actor" in message and "already broken" in message
    assert not (tmp_path / "ppo" / "actor").exists()


def test_step3_stops_at_nan_scores_before_the_update(tiny_model_dir, records, tmp_path):
    from chatrlhf.training.step3_ppo import main as ppo_main

    good = tiny_model_dir("llama")
    calls = {"n": 0}

    def reward(prompts, responses):  # fine for the first evaluation, NaN from the first training rollout on
        calls["n"] += 1
        return [float("nan") if calls["n"] > 1 else 0.5] * len(responses)

    out = tmp_path / "ppo"
    cfg = from_flat(PPOConfig, _ppo_flags(good, good, out, records, tmp_path / "c"))
    with pytest.raises(Exception) as e:
        ppo_main.run(cfg, reward_fn=reward)
    message = str(e.value)
    assert type(e.value).__name__ == "NonFiniteError", message
    assert "step 1, the rollout: scores hold NaN" in message and "--reward_function" in message
    assert not (out / "actor").exists()
