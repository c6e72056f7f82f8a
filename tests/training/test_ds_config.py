"""chatrlhf.training.ds_config: our settings -> DeepSpeed config dict (pure, no deepspeed needed)."""
import copy
import json
import sys

import pytest

from chatrlhf.training.ds_config import build_ds_config, merge_user_config, read_user_config, resolve_dtype


def build(**overrides):
    kwargs = dict(zero_stage=0, dtype="fp32", micro_batch_size=4, gradient_accumulation_steps=2, world_size=1)
    kwargs.update(overrides)
    return build_ds_config(**kwargs)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_is_set(stage):
    cfg = build(zero_stage=stage)
    assert cfg["zero_optimization"]["stage"] == stage
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)
    json.dumps(cfg)  # DeepSpeed takes it as JSON-able data


def test_stage3_gathers_weights_on_save():
    assert build(zero_stage=3)["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("stage", [-1, 4, 5])
def test_bad_stage_is_an_error(stage):
    with pytest.raises(ValueError, match="zero_stage"):
        build(zero_stage=stage)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_no_offload_by_default(stage):
    zero = build(zero_stage=stage)["zero_optimization"]
    assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_offload_optimizer_and_params_only_at_stage3(stage):
    zero = build(zero_stage=stage, offload=True)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in zero) == (stage == 3)
    if stage == 3:
        assert zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_inference_only_never_offloads_an_optimizer(stage):
    cfg = build(zero_stage=stage, offload=True, inference_only=True)
    zero = cfg["zero_optimization"]
    assert "offload_optimizer" not in zero
    assert ("offload_param" in zero) == (stage == 3)  # a frozen ZeRO-3 model may still keep its weights on CPU
    assert "zero_force_ds_cpu_optimizer" not in cfg


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_precision_flags(dtype):
    cfg = build(dtype=dtype)
    assert cfg["bf16"]["enabled"] is (dtype == "bf16")
    assert cfg["fp16"]["enabled"] is (dtype == "fp16")


@pytest.mark.parametrize("dtype", ["auto", "fp8", "float16", ""])
def test_unresolved_or_bad_dtype_is_an_error(dtype):
    with pytest.raises(ValueError, match="dtype"):
        build(dtype=dtype)


@pytest.mark.parametrize("micro,accum,world", [(1, 1, 1), (4, 2, 1), (8, 1, 2), (3, 5, 7)])
def test_batch_sizes(micro, accum, world):
    cfg = build(micro_batch_size=micro, gradient_accumulation_steps=accum, world_size=world)
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accum
    assert cfg["train_batch_size"] == micro * accum * world


@pytest.mark.parametrize("clip", [0.0, 1.0, 0.5])
def test_gradient_clipping(clip):
    assert build(gradient_clipping=clip)["gradient_clipping"] == clip
    assert build()["gradient_clipping"] == 1.0


def test_user_config_is_deep_merged_and_wins():
    ours = build(zero_stage=3, offload=True)
    user = {
        "zero_optimization": {"stage3_max_live_parameters": 1e9, "offload_optimizer": {"pin_memory": False}},
        "gradient_clipping": 0.3,
        "bf16": {"enabled": True},
        "flops_profiler": {"enabled": True},
    }
    user_before = copy.deepcopy(user)
    cfg = build(zero_stage=3, offload=True, user_config=user)
    zero = cfg["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 1e9  # theirs
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}  # nested: their key, our other key
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True  # ours kept
    assert zero["offload_param"] == ours["zero_optimization"]["offload_param"]
    assert cfg["gradient_clipping"] == 0.3 and cfg["bf16"]["enabled"] is True
    assert cfg["flops_profiler"] == {"enabled": True}  # new keys added
    assert cfg["train_batch_size"] == ours["train_batch_size"]
    assert user == user_before  # inputs are not mutated


def test_merge_user_config_is_pure_and_replaces_non_dicts():
    ours = {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2], "f": {"g": 1}}
    ours_before = copy.deepcopy(ours)
    theirs = {"a": {"c": {"x": 3}}, "e": [3], "f": 5}
    merged = merge_user_config(ours, theirs)
    assert merged == {"a": {"b": 1, "c": {"d": 2, "x": 3}}, "e": [3], "f": 5}
    assert ours == ours_before
    merged["a"]["c"]["x"] = 99
    assert theirs["a"]["c"]["x"] == 3  # the result shares nothing with the inputs


def test_user_batch_keys_must_agree_with_the_flags():
    # Agreeing values are fine; a disagreeing one is refused, naming the flag to use instead.
    cfg = build(user_config={"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4})
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        build(user_config={"train_micro_batch_size_per_gpu": 2})
    with pytest.raises(ValueError, match="train_batch_size=64"):
        build(user_config={"train_batch_size": 64})


def test_read_user_config(tmp_path):
    assert read_user_config(None) is None and read_user_config("") is None
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert read_user_config(str(good)) == {"zero_optimization": {"stage": 2}}

    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as e:
        read_user_config(str(missing))
    assert "--deepspeed_config" in str(e.value) and str(missing) in str(e.value)

    bad = tmp_path / "bad.json"
    bad.write_text("{'zero_optimization': 1,}")
    with pytest.raises(ValueError) as e:
        read_user_config(str(bad))
    assert "--deepspeed_config" in str(e.value) and str(bad) in str(e.value)


@pytest.mark.parametrize("dtype,supported,expected", [
    ("auto", True, "bf16"), ("auto", False, "fp32"),
    ("fp16", True, "fp16"), ("fp16", False, "fp16"),
    ("bf16", True, "bf16"), ("fp32", True, "fp32"), ("fp32", False, "fp32"),
])
def test_resolve_dtype(dtype, supported, expected):
    assert resolve_dtype(dtype, bf16_supported=supported) == expected


def test_module_imports_no_deepspeed():
    import subprocess

    code = "import sys, chatrlhf.training.ds_config; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_reduce_in_deepspeeds_default_bucket_and_leave_overlap_to_it(stage):
    # A 5e7 bucket cut a 135M model's gradient reduction into three collectives; DeepSpeed's default is 5e8.
    zero = build(zero_stage=stage)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 5e8 and zero["contiguous_gradients"] is True
    assert "overlap_comm" not in zero  # DeepSpeed's default for the stage


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_whole_bucket_all_reduce_only_when_asked_and_only_at_zero_1_to_3(stage):
    assert "reduce_scatter" not in build(zero_stage=stage)["zero_optimization"]  # DeepSpeed's default: partitioned
    zero = build(zero_stage=stage, reduce_scatter=False)["zero_optimization"]
    assert zero.get("reduce_scatter", True) is (stage == 0)


def test_zero3_keeps_deepspeeds_live_parameter_budget():
    zero = build(zero_stage=3)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 1e9 and zero["stage3_prefetch_bucket_size"] == 5e7
    assert "reduce_bucket_size" not in zero
