"""Step 1 end to end on tiny random models and real HH-RLHF records: learning, ranks, LoRA, reload, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.training import checkpoint
from chatrlhf.training.step1_sft import main as sft_main
from chatrlhf.training.step1_sft import trainer
from chatrlhf.training.step1_sft.config import SFTConfig
from chatrlhf.utils.config import from_flat, load_config
from chatrlhf.utils.logging import read_metrics

REPO = Path(__file__).resolve().parents[3]


def _flags(model_dir, out, data, cache, **extra) -> dict:
    flags = dict(model_name_or_path=str(model_dir), data_path=[str(data)], data_split="10,0,0", dtype="fp32",
                 output_dir=str(out), data_output_path=str(cache), max_seq_len=96, per_device_train_batch_size=4,
                 per_device_eval_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant", eval_iters=4,
                 seed=7, skip_malformed=True)
    flags.update(extra)
    return flags


def _argv(flags: dict) -> list[str]:
    return [a for k, v in flags.items() for a in (f"--{k}", *map(str, v if isinstance(v, list) else [v]))]


@pytest.fixture(scope="module")
def real_records(tmp_path_factory, hh_rlhf_sample):
    """48 real HH-RLHF pairs as a local JSONL file (a few dozen records, as a user's own file would be)."""
    return hh_rlhf_sample(48, tmp_path_factory.mktemp("data"))


def _train_losses(out) -> list[float]:
    return [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]


def _evals(out) -> list[float]:
    return [m["eval/loss"] for m in read_metrics(out) if "eval/loss" in m]


def test_loss_goes_down_on_real_records_and_saves_hf_model(tiny_model_dir, real_records, tmp_path):
    out = tmp_path / "sft"
    cfg = from_flat(SFTConfig, _flags(tiny_model_dir("llama"), out, real_records, tmp_path / "cache",
                                      num_train_epochs=6, eval_fraction=0.1, enable_tensorboard=True))
    metrics = sft_main.run(cfg)
    evals = _evals(out)
    assert evals[-1] < evals[0] - 0.5, evals  # held-out loss drops clearly from the random start
    assert metrics["eval/perplexity"] < torch.exp(torch.tensor(evals[0])).item()
    # Plain transformers loads the result; the resolved config sits next to it.
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file() and tok.pad_token_id != tok.eos_token_id
    assert load_config(SFTConfig, out) == cfg
    assert model.config.pad_token_id == tok.pad_token_id
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"


@pytest.mark.parametrize("family", ["opt", "gpt2", "qwen2", "gpt_neox", "bloom"])
def test_every_family_trains_and_reloads(family, tiny_model_dir, real_records, tmp_path):
    out = tmp_path / family
    cfg = from_flat(SFTConfig, _flags(tiny_model_dir(family, chat_template=family != "opt"), out, real_records,
                                      tmp_path / "cache", max_steps=3))
    sft_main.run(cfg)
    assert len(_train_losses(out)) == 3
    AutoModelForCausalLM.from_pretrained(out)


def test_lora_trains_only_the_adapters(tiny_model_dir, real_records, tmp_path):
    base_dir = tiny_model_dir("llama")
    out, out_adapter = tmp_path / "merged", tmp_path / "adapter"
    flags = dict(lora_dim=4, only_optimize_lora=True, max_steps=4, lora_learning_rate=1e-2)
    sft_main.run(from_flat(SFTConfig, _flags(base_dir, out, real_records, tmp_path / "c", **flags)))
    sft_main.run(from_flat(SFTConfig, _flags(base_dir, out_adapter, real_records, tmp_path / "c",
                                             keep_lora_adapter=True, **flags)))
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed, "LoRA changed nothing"
    # Only Linear weights inside the blocks change (merged adapters); embeddings and norms are frozen.
    assert all(".layers." in k and k.endswith("proj.weight") for k in changed), changed
    # The kept adapter, applied to the base with peft, reproduces the merged model.
    from peft import PeftModel

    ids = torch.randint(0, 400, (2, 12))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out_adapter)
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_engine_save_then_reload_gives_identical_logits(tiny_model_dir, tmp_path):
    from chatrlhf.training.builders import build_trained_model
    from chatrlhf.training.config import EngineArgs, ModelArgs, OptimArgs
    from chatrlhf.utils.models import load_tokenizer

    path = str(tiny_model_dir("llama"))
    tok = load_tokenizer(path)
    engine = build_trained_model(ModelArgs(model_name_or_path=path, lora_dim=4), OptimArgs(), EngineArgs(dtype="fp32"), tok,
                                 head="causal_lm", micro_batch_size=2, total_steps=2)
    ids = torch.randint(0, 400, (2, 10))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    engine.save_pretrained(tmp_path / "m", tok)
    engine.eval()
    with torch.no_grad():
        ours = engine(input_ids=ids).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


class Crash(RuntimeError):
    pass


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tiny_model_dir, real_records, tmp_path,
                                                                      monkeypatch):
    model = tiny_model_dir("llama")
    flags = dict(max_steps=6, save_interval=2, dropout=0.1)  # dropout: the RNG state must be restored too
    straight = tmp_path / "straight"
    sft_main.run(from_flat(SFTConfig, _flags(model, straight, real_records, tmp_path / "c", **flags)))

    resumed = tmp_path / "resumed"
    cfg = from_flat(SFTConfig, _flags(model, resumed, real_records, tmp_path / "c", **flags))
    real_loss, calls = trainer.sft_loss, {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-way through step 5, after the step-4 checkpoint
            raise Crash("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "sft_loss", crashing_loss)
    with pytest.raises(Crash):
        sft_main.run(cfg)
    assert checkpoint.latest(resumed).name == "step_4"
    assert load_config(SFTConfig, checkpoint.latest(resumed)) == cfg  # the resolved config sits next to it
    monkeypatch.setattr(trainer, "sft_loss", real_loss)
    sft_main.run(cfg)

    by_step = lambda out: {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}  # noqa: E731
    assert by_step(resumed) == pytest.approx(by_step(straight), abs=1e-5)
    assert _evals(resumed)[-1] == pytest.approx(_evals(straight)[-1], abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_crash_during_a_save_keeps_the_previous_checkpoint(tiny_model_dir, real_records, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = from_flat(SFTConfig, _flags(tiny_model_dir("llama"), out, real_records, tmp_path / "c", max_steps=4,
                                      save_interval=2))
    from chatrlhf.training.hybrid_engine import HybridEngine

    real_save = HybridEngine.save_checkpoint

    def dying_save(self, save_dir, tag):
        if str(save_dir).endswith("step_4") or Path(save_dir).name == "step_4":
            raise Crash("disk full")
        return real_save(self, save_dir, tag)

    monkeypatch.setattr(HybridEngine, "save_checkpoint", dying_save)
    cfg.train.max_steps = 6
    with pytest.raises(Crash):
        sft_main.run(cfg)
    assert checkpoint.latest(out).name == "step_2"
    monkeypatch.setattr(HybridEngine, "save_checkpoint", real_save)
    sft_main.run(cfg)  # resumes from step 2 and finishes
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps[-1] == 6


@pytest.mark.distributed
def test_two_ranks_zero3_match_one_process(tiny_model_dir, real_records, tmp_path, deepspeed_launch):
    model = tiny_model_dir("llama")
    one = tmp_path / "one"
    sft_main.run(from_flat(SFTConfig, _flags(model, one, real_records, tmp_path / "c", max_steps=5,
                                             per_device_train_batch_size=4)))
    two = tmp_path / "two"
    # A user DeepSpeed JSON (merged over ours) that makes ZeRO-3 partition even a tiny model's small tensors.
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    flags = _flags(model, two, real_records, tmp_path / "c", max_steps=5, per_device_train_batch_size=2,
                   zero_stage=3, deepspeed_config=str(ds_json))
    argv = _argv(flags)
    # The script form users know from DeepSpeed-Chat: deepspeed training/step1_sft/main.py ...
    deepspeed_launch(str(REPO / "training" / "step1_sft" / "main.py"), argv)
    assert _train_losses(two) == pytest.approx(_train_losses(one), abs=2e-4)
    assert _evals(two)[-1] == pytest.approx(_evals(one)[-1], abs=2e-4)
    # The ZeRO-3 shards were gathered into one Hugging Face model equal to the one-process model.
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(one)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(two)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_zero3_loads_each_rank_a_shard(tiny_model_dir):
    """Under ZeRO-3 the weights are partitioned while loading (zero.Init), not loaded whole then split."""
    from chatrlhf.training.builders import build_trained_model
    from chatrlhf.training.config import EngineArgs, ModelArgs, OptimArgs
    from chatrlhf.utils.models import load_tokenizer

    path = str(tiny_model_dir("llama"))
    engine = build_trained_model(ModelArgs(model_name_or_path=path, zero_stage=3), OptimArgs(), EngineArgs(dtype="fp32"),
                                 load_tokenizer(path), head="causal_lm", micro_batch_size=1, total_steps=1)
    params = list(engine.module.parameters())
    assert all(hasattr(p, "ds_id") for p in params)
    big = [p for p in params if p.ds_numel > 1e4]  # above the persistence threshold: released between uses
    assert big and all(p.numel() == 0 for p in big)


def test_the_installed_console_script_trains_and_exits_0(tiny_model_dir, real_records, tmp_path, lone_process):
    """`chatrlhf-sft ...` as pip installed it (the wrapper does `sys.exit(cli())`): a run that succeeds ends with
    status 0 and a saved model (it was status 1, with the metrics dict printed as the error, when the script was
    main itself)."""
    out = tmp_path / "sft"
    flags = _flags(tiny_model_dir("llama"), out, real_records, tmp_path / "cache", max_steps=1, eval_iters=1)
    wrapper = ("import sys\nfrom importlib.metadata import entry_points\n"
               "(script,) = [e for e in entry_points(group='console_scripts') if e.name == 'chatrlhf-sft']\n"
               "assert script.value == 'chatrlhf.training.step1_sft.main:cli', script.value\n"
               f"sys.argv = ['chatrlhf-sft', *{_argv(flags)!r}]\n"
               "sys.exit(script.load()())\n")
    proc = lone_process(["-c", wrapper])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(out) is not None
