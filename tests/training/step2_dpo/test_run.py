"""DPO end to end on tiny random models: a planted preference learned, plain-transformers reload, the reference
(live, precomputed, reference-free, LoRA adapters off) and its equivalences at step 0, every loss type, resume
after a kill, two ZeRO-3 ranks against one process, and DeepSpeed-Chat's DPO command lines."""
from __future__ import annotations

import gc
import json
import math
import os
import random
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatrlhf.training import checkpoint
from chatrlhf.training.data.pipeline import load_phase_data
from chatrlhf.training.step2_dpo import main as dpo_main
from chatrlhf.training.step2_dpo import trainer
from chatrlhf.training.step2_dpo.config import DPOConfig
from chatrlhf.training.step2_dpo.data import DPO_DATA, DPOCollator
from chatrlhf.training.step2_dpo.loss import preference_losses, sequence_logprobs, token_logprobs
from chatrlhf.utils.config import from_flat, load_config, parse_config
from chatrlhf.utils.logging import read_metrics
from chatrlhf.utils.models import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[3]
MARKER = "fig"
# Words of two tokens each under the test tokenizer, like " fig": a pair differs in one word and not in length.
WORDS = "cat sat mat food car dog see then moon star bed hat pen ox".split()


def write_planted(path: Path, n: int, seed: int = 0) -> Path:
    """n pairs whose chosen answer contains MARKER where the rejected one has another word instead."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + "?"
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
            at = rng.randint(0, len(words))
            chosen = " ".join(words[:at] + [MARKER] + words[at:])
            rejected = " ".join(words[:at] + [rng.choice(WORDS)] + words[at:])
            f.write(json.dumps({"prompt": question, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted(tmp_path_factory.mktemp("planted") / "pairs.jsonl", 400)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40 pairs: 32 train (one batch of 32 holds them all), 8 eval."""
    return write_planted(tmp_path_factory.mktemp("small") / "pairs.jsonl", 40, seed=1)


def _flags(model_dir, out, data, cache, **extra) -> dict:
    flags = dict(model_name_or_path=str(model_dir), data_path=[str(data)], data_split="0,1,0", eval_fraction=0.2,
                 dtype="fp32", output_dir=str(out), data_output_path=str(cache), max_seq_len=48,
                 per_device_train_batch_size=16, per_device_eval_batch_size=40, learning_rate=3e-3,
                 lr_scheduler_type="constant", eval_iters=10, eval_interval=0, seed=3)
    flags.update(extra)
    return flags


def _argv(flags: dict) -> list[str]:
    return [str(a) for k, v in flags.items() for a in (f"--{k}", *(v if isinstance(v, list) else [v]))]


def _evals(out, key="eval/accuracy") -> list[float]:
    return [m[key] for m in read_metrics(out) if key in m]


def _train_losses(out) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}


def _hf_logprobs(model_dir, cfg: DPOConfig, split: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probabilities of every pair of `split` from a saved model loaded by
    plain transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(str(model_dir))
    data = load_phase_data(cfg.data, DPO_DATA, tok, seed=cfg.train.seed, max_seq_len=cfg.train.max_seq_len)
    pairs = getattr(data, split)
    batch = DPOCollator(tok)([pairs[i] for i in range(len(pairs))])
    with torch.no_grad():
        lp = sequence_logprobs(token_logprobs(model(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]).logits,
                                              batch["input_ids"]), batch["action_mask"])
    half = lp.numel() // 2
    return lp[:half], lp[half:]


@pytest.fixture(scope="module")
def planted_run(tiny_model_dir, planted, tmp_path_factory):
    """A tiny llama trained by DPO on the planted preference (shared by the tests that read its output)."""
    tmp = tmp_path_factory.mktemp("dpo")
    out = tmp / "dpo"
    cfg = from_flat(DPOConfig, _flags(tiny_model_dir("llama"), out, planted, tmp / "cache", max_steps=60,
                                      num_train_epochs=3, eval_interval=20, enable_tensorboard=True))
    return cfg, out, dpo_main.run(cfg)


def test_planted_marker_is_learned_to_over_95_percent_held_out(planted_run):
    cfg, out, metrics = planted_run
    accuracy = _evals(out)
    assert accuracy[0] == 0.5, accuracy  # policy = reference: every implicit reward is 0, a tie counts half
    assert metrics["eval/accuracy"] > 0.95 and metrics["eval/pairs"] == 80, metrics
    assert metrics["eval/margin"] == pytest.approx(metrics["eval/chosen_reward"] - metrics["eval/rejected_reward"])
    assert metrics["eval/margin"] > 0 and metrics["eval/kl_chosen"] > 0 and _evals(out, "eval/kl_chosen")[0] == 0
    assert metrics["eval/shorter_wins"] == pytest.approx(0.5, abs=0.1)  # the cue is the marker, not the length
    # Evaluated before training, every --eval_interval steps and at the end.
    assert [m["step"] for m in read_metrics(out) if "eval/accuracy" in m] == [0, 20, 40, 60]
    keys = ("train/accuracy", "train/margin", "train/chosen_reward", "train/rejected_reward", "train/chosen_logprob")
    assert all(k in m for m in read_metrics(out) if "train/loss" in m for k in keys)
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_saved_model_loads_in_plain_transformers_with_the_evaluated_logprobs(planted_run):
    cfg, out, metrics = planted_run
    chosen, rejected = _hf_logprobs(out, cfg)
    assert chosen.mean().item() == pytest.approx(metrics["eval/chosen_logprob"], abs=1e-3)
    assert rejected.mean().item() == pytest.approx(metrics["eval/rejected_logprob"], abs=1e-3)
    # The implicit reward needs the reference (the starting model): the accuracy is the one evaluated.
    ref_chosen, ref_rejected = _hf_logprobs(cfg.model.model_name_or_path, cfg)
    margin = cfg.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    assert (margin > 0).float().mean().item() == pytest.approx(metrics["eval/accuracy"])
    assert load_config(DPOConfig, out) == cfg


def _spy_frozen_models(monkeypatch) -> list:
    """Counts (weakly) the reference models main.py builds."""
    built, real = [], dpo_main.build_frozen_model

    def spy(*args, **kwargs):
        engine = real(*args, **kwargs)
        built.append(weakref.ref(engine.module))
        return engine

    monkeypatch.setattr(dpo_main, "build_frozen_model", spy)
    return built


def test_precomputed_and_reference_free_give_the_live_reference_loss_at_step_0(tiny_model_dir, small, tmp_path,
                                                                               monkeypatch):
    model = tiny_model_dir("llama")
    flags = lambda name, **kw: _flags(model, tmp_path / name, small, tmp_path / "c", max_steps=2,  # noqa: E731
                                      per_device_train_batch_size=32, **kw)
    dpo_main.run(from_flat(DPOConfig, flags("live")))
    built = _spy_frozen_models(monkeypatch)
    dpo_main.run(from_flat(DPOConfig, flags("pre", precompute_ref_logprobs=True)))
    assert len(built) == 1
    gc.collect()
    assert built[0]() is None  # the reference was released after its one pass: training held one model
    live, pre = _train_losses(tmp_path / "live"), _train_losses(tmp_path / "pre")
    assert live[1] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    assert pre == pytest.approx(live, abs=1e-5)  # the same reference numbers, so the same run
    for key in ("eval/loss", "eval/accuracy", "eval/margin"):
        assert _evals(tmp_path / "pre", key) == pytest.approx(_evals(tmp_path / "live", key), abs=1e-5)
    assert "eval/kl_chosen" not in read_metrics(tmp_path / "pre")[0]  # no reference model to compare with

    cfg = from_flat(DPOConfig, flags("free", reference_free=True))
    dpo_main.run(cfg)
    assert len(built) == 1  # reference-free: none built
    chosen, rejected = _hf_logprobs(model, cfg, "train")  # the one step-0 batch is the whole train split
    by_hand = preference_losses("sigmoid", chosen, rejected, torch.zeros_like(chosen), torch.zeros_like(rejected),
                                beta=cfg.beta)[0].mean().item()
    assert _train_losses(tmp_path / "free")[1] == pytest.approx(by_hand, abs=1e-5)


@pytest.mark.parametrize("loss_type, extra", [("cdpo", {"label_smoothing": 0.1}), ("ipo", {}),
                                              ("simpo", {"beta": 2.0, "simpo_gamma": 0.5})])
def test_every_loss_type_trains_and_reaches_the_loss(loss_type, extra, tiny_model_dir, small, tmp_path, monkeypatch):
    seen, real = [], trainer.preference_losses

    def spy(kind, *args, **kwargs):
        seen.append((kind, kwargs))
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(trainer, "preference_losses", spy)
    built = _spy_frozen_models(monkeypatch)
    out = tmp_path / loss_type
    metrics = dpo_main.run(from_flat(DPOConfig, _flags(tiny_model_dir("llama"), out, small, tmp_path / "c",
                                                       max_steps=3, per_device_train_batch_size=8,
                                                       loss_type=loss_type, **extra)))
    assert {kind for kind, _ in seen} == {loss_type}
    assert seen[0][1]["beta"] == extra.get("beta", 0.1)
    assert seen[0][1]["label_smoothing"] == extra.get("label_smoothing", 0.0)
    assert len(built) == (0 if loss_type == "simpo" else 1)  # SimPO is reference-free
    assert len(_train_losses(out)) == 3 and all(math.isfinite(v) for v in _train_losses(out).values())
    assert metrics["eval/pairs"] == 8


def test_lora_trains_only_the_adapters_against_the_adapters_off_model(tiny_model_dir, planted, tmp_path, monkeypatch):
    built = _spy_frozen_models(monkeypatch)
    base_dir = tiny_model_dir("llama")
    out = tmp_path / "lora"
    cfg = from_flat(DPOConfig, _flags(base_dir, out, planted, tmp_path / "c", lora_dim=8, only_optimize_lora=True,
                                      lora_learning_rate=1e-2, max_steps=20))
    kinds = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda engine, ref, *a: kinds.append(ref.kind) or real_train(engine, ref, *a))
    metrics = dpo_main.run(cfg)
    assert built == [] and kinds == ["adapters"]  # no second model
    assert metrics["eval/accuracy"] > 0.8 and metrics["eval/kl_chosen"] > 0, metrics
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # Merged adapters change Linear weights in the blocks only; embeddings and norms stayed frozen.
    assert changed and all(".layers." in k and k.endswith("proj.weight") for k in changed), changed
    chosen, _ = _hf_logprobs(out, cfg)
    assert chosen.mean().item() == pytest.approx(metrics["eval/chosen_logprob"], abs=1e-3)


def test_lora_with_a_training_base_precomputes_its_reference(tiny_model_dir, small, tmp_path, monkeypatch):
    built = _spy_frozen_models(monkeypatch)
    kinds = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda engine, ref, *a: kinds.append(ref.kind) or real_train(engine, ref, *a))
    out = tmp_path / "lora_base"
    dpo_main.run(from_flat(DPOConfig, _flags(tiny_model_dir("llama"), out, small, tmp_path / "c", lora_dim=4,
                                             max_steps=2, per_device_train_batch_size=32)))
    assert built == [] and kinds == ["precomputed"]
    assert _train_losses(out)[1] == pytest.approx(math.log(2), abs=1e-6)  # adapters-off = policy at step 0


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("extra", [{}, {"precompute_ref_logprobs": True}], ids=["live", "precomputed"])
def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(extra, tiny_model_dir, planted, tmp_path,
                                                                     monkeypatch):
    model = tiny_model_dir("llama")
    flags = dict(max_steps=6, save_interval=2, dropout=0.1, per_device_train_batch_size=8, eval_iters=1, **extra)
    straight = tmp_path / "straight"
    dpo_main.run(from_flat(DPOConfig, _flags(model, straight, planted, tmp_path / "c", **flags)))

    resumed = tmp_path / "resumed"
    cfg = from_flat(DPOConfig, _flags(model, resumed, planted, tmp_path / "c", **flags))
    real_loss, calls = trainer.dpo_loss, {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the step-4 checkpoint
            raise Crash("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "dpo_loss", crashing_loss)
    with pytest.raises(Crash):
        dpo_main.run(cfg)
    assert checkpoint.latest(resumed).name == "step_4"
    monkeypatch.setattr(trainer, "dpo_loss", real_loss)
    dpo_main.run(cfg)

    assert _train_losses(resumed) == pytest.approx(_train_losses(straight), abs=1e-5)
    assert _evals(resumed, "eval/loss")[-1] == pytest.approx(_evals(straight, "eval/loss")[-1], abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_flags_defaults_and_refusals():
    cfg = parse_config(DPOConfig, [])
    assert (cfg.beta, cfg.label_smoothing, cfg.loss_type, cfg.reference_free) == (0.1, 0.0, "sigmoid", False)
    assert cfg.train.output_dir == "output/step2_dpo" and cfg.optim.learning_rate == 1e-6
    cfg = parse_config(DPOConfig, ["--loss_type", "simpo", "--simpo_gamma", "1.0", "--beta", "2"])
    assert cfg.loss_type == "simpo" and cfg.simpo_gamma == 1.0 and not cfg.uses_reference()
    for bad in (["--loss_type", "kto"], ["--beta", "0"], ["--label_smoothing", "0.5"], ["--loss_type", "cdpo"],
                ["--loss_type", "ipo", "--label_smoothing", "0.1"], ["--reference_free", "--precompute_ref_logprobs"],
                ["--loss_type", "simpo", "--precompute_ref_logprobs"], ["--simpo_gamma", "-1"]):
        with pytest.raises(SystemExit):
            parse_config(DPOConfig, bad)


def _dschat_dpo_command_lines() -> list[dict]:
    records = json.loads((REPO / "tests" / "data" / "dschat" / "command_lines.json").read_text())
    return [r for r in records if r["step"] == "step2_dpo"]


def test_deepspeed_chat_dpo_command_lines_parse():
    lines = _dschat_dpo_command_lines()
    assert len(lines) == 10
    for record in lines:
        argv = record["argv"]
        cfg = parse_config(DPOConfig, ["--local_rank=0"] + argv)  # what the deepspeed launcher puts first
        value = lambda flag, default=None: argv[argv.index(flag) + 1] if flag in argv else default  # noqa: E731
        assert cfg.model.model_name_or_path == value("--model_name_or_path")
        assert cfg.model.zero_stage == int(value("--zero_stage"))
        assert cfg.optim.learning_rate == float(value("--learning_rate", 1e-6))
        if "--data_path" in argv:
            start = argv.index("--data_path") + 1
            end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
            assert cfg.data.data_path == argv[start:end]
        assert cfg.train.enable_tensorboard == ("--enable_tensorboard" in argv)
        assert cfg.data.data_split == value("--data_split", "2,4,4") and cfg.dschat.deepspeed
        assert cfg.engine.offload == ("--offload" in argv)
        assert cfg.model.lora_dim == int(value("--lora_dim", 0))
        assert cfg.train.output_dir == value("--output_dir") and cfg.loss_type == "sigmoid" and cfg.beta == 0.1
    # DeepSpeed-Chat's own DPO flags, with their names and meanings
    cfg = parse_config(DPOConfig, ["--beta", "0.3", "--label_smoothing", "0.1", "--offload_reference_model"])
    assert (cfg.beta, cfg.label_smoothing, cfg.offload_reference_model) == (0.3, 0.1, True)


def test_script_form_runs_as_in_deepspeed_chat(tiny_model_dir, small, tmp_path):
    """`python training/step2_dpo/main.py ...`: the file run directly, as DeepSpeed-Chat users launch it."""
    out = tmp_path / "script"
    flags = _flags(tiny_model_dir("llama"), out, small, tmp_path / "c", max_steps=1, eval_iters=1)
    # In-process runs earlier in this session joined a one-rank group through these; the child makes its own.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "training" / "step2_dpo" / "main.py"), *_argv(flags)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (out / "model.safetensors").is_file() and len(_train_losses(out)) == 1


@pytest.mark.distributed
def test_two_ranks_zero3_match_one_process(tiny_model_dir, planted, tmp_path, deepspeed_launch):
    model = tiny_model_dir("llama")
    extra = dict(max_steps=4, per_device_eval_batch_size=20, eval_iters=4, label_smoothing=0.1)  # all 80 pairs
    one = tmp_path / "one"
    dpo_main.run(from_flat(DPOConfig, _flags(model, one, planted, tmp_path / "c", per_device_train_batch_size=8,
                                             **extra)))
    two = tmp_path / "two"
    flags = _flags(model, two, planted, tmp_path / "c", per_device_train_batch_size=4, zero_stage=3, **extra)
    deepspeed_launch("chatrlhf.training.step2_dpo", _argv(flags))
    assert list(_train_losses(two)) == [1, 2, 3, 4]
    assert _train_losses(two) == pytest.approx(_train_losses(one), abs=2e-4)
    for key in ("eval/loss", "eval/accuracy", "eval/chosen_logprob", "eval/kl_chosen"):
        assert _evals(two, key)[-1] == pytest.approx(_evals(one, key)[-1], abs=2e-3, rel=1e-3)
    assert _evals(two, "eval/pairs") == _evals(one, "eval/pairs") == [80, 80]
    # The ZeRO-3 shards were gathered into one plain model.
    cfg = load_config(DPOConfig, two)
    torch.testing.assert_close(_hf_logprobs(two, cfg)[0], _hf_logprobs(one, cfg)[0], atol=5e-3, rtol=1e-3)
