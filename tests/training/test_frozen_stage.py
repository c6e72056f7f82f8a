"""Frozen models' ZeRO stage (chatrlhf.training.builders.frozen_zero_stage, step 3's --reference_zero_stage and
--reward_zero_stage): as asked, or "auto": a replica (stage 0) when the weights fit a quarter of the memory they
would live in, ZeRO-3 when they do not, when they must be offloaded, or when the model cannot be sized. And the
same rule for trained ZeRO-3 models gathered whole per training forward (--zero3_gather_whole)."""
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


def test_zero3_gather_whole_auto_follows_the_same_fit_and_never_below_zero3(tiny_model_dir, monkeypatch):
    from chatrlhf.training.config import ModelArgs
    from chatrlhf.training.precision import FAST_PATHS_ENV

    path = str(tiny_model_dir("llama"))
    z3, z2 = ModelArgs(model_name_or_path=path, zero_stage=3), ModelArgs(model_name_or_path=path, zero_stage=2)
    assert builders.gather_whole("auto", z3, "fp32", offload=False)
    assert not builders.gather_whole("true", z2, "fp32", offload=False)  # nothing to gather below ZeRO-3
    assert not builders.gather_whole("auto", z3, "fp32", offload=True)  # offload: memory first
    assert builders.gather_whole("true", z3, "fp32", offload=True) and not builders.gather_whole("false", z3, "fp32",
                                                                                               offload=False)
    monkeypatch.setenv(FAST_PATHS_ENV, "0")
    assert not builders.gather_whole("auto", z3, "fp32", offload=False)
    monkeypatch.delenv(FAST_PATHS_ENV)
    params = memory_plan.shape_of(path).params
    monkeypatch.setattr(memory_plan, "available_memory", lambda on_cpu: (None, 2 * 4 * params * 3.9))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not builders.gather_whole("auto", z3, "fp32", offload=False)  # over a quarter of the RAM per rank


def test_memory_plan_counts_whole_zero3_weights_on_a_gpu(tiny_model_dir):
    shape = memory_plan.shape_of(str(tiny_model_dir("llama")))
    layer_by_layer = memory_plan.Trained(shape, zero_stage=3)
    whole = memory_plan.Trained(shape, zero_stage=3, gather_whole=True)
    rows = {m.gather_whole: memory_plan.model_states("actor", m, "bf16", world=8, on_cpu=False)[0]
            for m in (layer_by_layer, whole)}
    n = shape.num_params("causal_lm")
    assert rows[True].device == pytest.approx(2 * n)  # a shard plus the other 7/8 gathered: the whole model
    assert rows[False].device == pytest.approx(2 * n / 8 + 2 * min(n, memory_plan.ZERO3_LIVE))  # a layer budget
