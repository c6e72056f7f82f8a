"""Frozen models' ZeRO stage (chatrlhf.training.builders.frozen_zero_stage, step 3's --reference_zero_stage and
--reward_zero_stage): as asked, or "auto": a replica (stage 0) when the weights fit a quarter of the memory they
would live in, ZeRO-3 when they do not, when they must be offloaded, or when the model cannot be sized."""
from __future__ import annotations

import pytest

from chatrlhf.training import builders, memory_plan


@pytest.mark.parametrize("choice,stage", [("0", 0), ("3", 3)])
def test_an_explicit_stage_is_kept(tiny_model_dir, choice, stage):
    assert builders.frozen_zero_stage(choice, str(tiny_model_dir("llama")), "fp32") == stage


def test_auto_keeps_a_model_that_fits_whole(tiny_model_dir):
    assert builders.frozen_zero_stage("auto", str(tiny_model_dir("llama")), "fp32") == 0


def test_auto_shards_a_model_that_does_not_fit(tiny_model_dir, monkeypatch):
    params = memory_plan.shape_of(str(tiny_model_dir("llama"))).params
    # Host RAM for 2 local ranks that leaves each less than 4x the fp32 weights.
    monkeypatch.setattr(memory_plan, "available_memory", lambda on_cpu: (None, 2 * 4 * params * 3.9))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert builders.frozen_zero_stage("auto", str(tiny_model_dir("llama")), "fp32") == 3
    assert builders.frozen_zero_stage("auto", str(tiny_model_dir("llama")), "bf16") == 0  # half the bytes fit


def test_auto_shards_when_offloaded_or_unknown(tiny_model_dir, tmp_path):
    assert builders.frozen_zero_stage("auto", str(tiny_model_dir("llama")), "fp32", offload=True) == 3
    assert builders.frozen_zero_stage("auto", str(tmp_path / "missing"), "fp32") == 3


def test_step3_flags_parse():
    from chatrlhf.training.step3_ppo.config import PPOConfig
    from chatrlhf.utils.config import parse_config

    cfg = parse_config(PPOConfig, ["--reference_zero_stage", "3", "--reward_zero_stage", "0"])
    assert (cfg.reference_zero_stage, cfg.reward_zero_stage) == ("3", "0")
    assert parse_config(PPOConfig, []).reference_zero_stage == "auto"
    with pytest.raises(SystemExit):
        parse_config(PPOConfig, ["--reward_zero_stage", "2"])
