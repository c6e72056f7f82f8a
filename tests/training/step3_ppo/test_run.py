"""Step 3 end to end on tiny random models: a rule-based reward is learned, two ZeRO-3 ranks on the hybrid engine,
resume after a kill, LoRA with the adapters-off reference, refused flags, a reward model with another tokenizer,
and the pretraining mix."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from chatrlhf.training import checkpoint
from chatrlhf.training.step3_ppo import main as ppo_main
from chatrlhf.training.step3_ppo import rewards, trainer
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.training.step3_ppo.ema import EMA_FILE
from chatrlhf.utils.config import from_flat, parse_config
from chatrlhf.utils.logging import read_metrics

WIKI = Path(__file__).resolve().parents[4] / "shared" / "data" / "text" / "wiki_demo.txt"
WORDS = "cat sat mat food car dog see then moon star bed hat pen ox".split()
STEP_KEYS = ("objective/scores", "objective/kl", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac",
             "ppo/policy/approxkl", "ppo/val/explained_variance", "ppo/response_length", "time/generation",
             "time/scoring", "time/training", "throughput/tokens_per_second")
EVAL_KEYS = ("eval/score_mean", "eval/score_std", "eval/kl", "eval/response_length", "eval/answers")


pytestmark = pytest.mark.usefixtures("one_thread")


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) + "?"
            f.write(json.dumps({"prompt": question, "chosen": "yes", "rejected": "no"}) + "\n")
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """128 short prompts: 96 to train on, 32 held out."""
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 128)


def vowel_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """The toy task: the share of an answer's characters that are vowels (about 0.23 for the random model)."""
    return [sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]


def _flags(actor, out, data, cache, critic=None, **extra) -> dict:
    flags = dict(actor_model_name_or_path=str(actor), critic_model_name_or_path=str(critic or actor),
                 data_path=[str(data)], data_split="0,0,1", eval_fraction=0.25, dtype="fp32", output_dir=str(out),
                 data_output_path=str(cache), max_prompt_seq_len=16, max_answer_seq_len=6,
                 per_device_generation_batch_size=8, per_device_training_batch_size=4, per_device_eval_batch_size=8,
                 ppo_epochs=2, actor_learning_rate=1e-3, critic_learning_rate=1e-3, lr_scheduler_type="constant",
                 num_train_epochs=100, max_steps=2, eval_iters=1, seed=5)
    flags.update(extra)
    return flags


def _argv(flags: dict) -> list[str]:
    argv = []
    for k, v in flags.items():
        if isinstance(v, bool):
            argv += [f"--{k}"] if v else []
        else:
            argv += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    return argv


def _steps(out) -> dict[int, dict]:
    """Per-step training metrics (evaluations left out), by step."""
    return {m["step"]: m for m in read_metrics(out) if "objective/scores" in m}


def _evals(out) -> list[dict]:
    return [m for m in read_metrics(out) if "eval/score_mean" in m]


def _mean(xs) -> float:
    return sum(xs) / len(xs)


# ------------------------------------------------------------------------------------ (a) learning

def test_a_rule_based_reward_is_learned_stably(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "ppo"
    # Several PPO epochs and minibatches per rollout with the default clip ranges, KL penalty and GAE.
    # normalize_scores gives the small vowel-fraction scores a unit scale next to the fresh critic's values.
    flags = _flags(tiny_model_dir("llama"), out, prompts, tmp_path / "cache", max_steps=25, ppo_epochs=4,
                   per_device_generation_batch_size=32, per_device_training_batch_size=16,
                   per_device_eval_batch_size=16, eval_iters=2, actor_learning_rate=2e-3, normalize_scores=True)
    final = ppo_main.run(from_flat(PPOConfig, flags), reward_fn=vowel_fraction)
    steps = _steps(out)
    assert sorted(steps) == list(range(1, 26))
    for step, m in steps.items():
        assert all(k in m and math.isfinite(m[k]) for k in STEP_KEYS), (step, m)
        assert m["ppo/policy/clipfrac"] < 0.5, (step, m["ppo/policy/clipfrac"])
    scores = [steps[s]["objective/scores"] for s in sorted(steps)]
    assert _mean(scores[-3:]) > _mean(scores[:3]) + 0.08, scores
    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 25] and all(k in e for e in evals for k in EVAL_KEYS)
    assert evals[-1]["eval/score_mean"] > evals[0]["eval/score_mean"] + 0.08, evals
    assert final["eval/score_mean"] == evals[-1]["eval/score_mean"]
    assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # before training the actor is the reference
    assert all(e["eval/answers"] == 32 for e in evals)  # 2 batches of 16 held-out prompts, none dropped
    assert all(0 < e["eval/score_std"] < 0.5 for e in evals)  # vowel fractions lie in [0, 1]
    AutoModelForCausalLM.from_pretrained(out / "actor")


# ------------------------------------------------------------------------------------ (b) two ZeRO-3 ranks

@pytest.mark.distributed
def test_two_ranks_zero3_hybrid_engine_run_completes_and_saves(tiny_model_dir, prompts, tmp_path, deepspeed_launch):
    model = tiny_model_dir("llama")
    zero3 = tmp_path / "zero3.json"  # every parameter partitioned, not only the embedding
    zero3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = tmp_path / "two"
    flags = _flags(model, out, prompts, tmp_path / "cache", actor_zero_stage=3, critic_zero_stage=3,
                   enable_hybrid_engine=True, per_device_generation_batch_size=4, per_device_training_batch_size=2,
                   deepspeed_config=str(zero3), print_answers=True)
    proc = deepspeed_launch("chatrlhf.training.step3_ppo", _argv(flags), timeout=400)
    assert "--- answer:" in proc.stdout + proc.stderr  # --print_answers
    steps = _steps(out)
    assert sorted(steps) == [1, 2] and all(math.isfinite(steps[s][k]) for s in steps for k in STEP_KEYS)
    assert [e["step"] for e in _evals(out)] == [0, 2]
    actor = AutoModelForCausalLM.from_pretrained(out / "actor")
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert critic.config.num_labels == 1
    base = AutoModelForCausalLM.from_pretrained(model).state_dict()
    trained = actor.state_dict()
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    tok = AutoTokenizer.from_pretrained(out / "actor")
    assert tok.pad_token_id != tok.eos_token_id


# ------------------------------------------------------------------------------------ (c) resume

class Crash(RuntimeError):
    pass


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tiny_model_dir, tmp_path, monkeypatch):
    model = tiny_model_dir("llama")
    data = write_prompts(tmp_path / "small.jsonl", 32, seed=1)  # 24 training prompts: 3 batches per epoch
    rng = random.Random(2)
    text = tmp_path / "mix.txt"  # a pretraining mix: its position in the stream is PPO state too
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)))
    extra = dict(max_steps=5, num_train_epochs=2, save_interval=2, adaptive_kl=True, target_kl=0.01, kl_horizon=100,
                 enable_ema=True, ema_beta=0.9, unsupervised_dataset_name=str(text), unsup_coef=0.5,
                 actor_dropout=0.1)  # dropout: the RNG state must be restored too
    straight = tmp_path / "straight"
    ppo_main.run(from_flat(PPOConfig, _flags(model, straight, data, tmp_path / "c", **extra)),
                 reward_fn=vowel_fraction)

    resumed = tmp_path / "resumed"
    cfg = from_flat(PPOConfig, _flags(model, resumed, data, tmp_path / "c", **extra))
    real, calls = trainer.ppo_update, {"n": 0}

    def crashing_update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5: after the step-4 checkpoint, which sits in the second epoch
            raise Crash("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "ppo_update", crashing_update)
    with pytest.raises(Crash):
        ppo_main.run(cfg, reward_fn=vowel_fraction)
    latest = checkpoint.latest(resumed)
    assert latest.name == "step_4" and (latest / EMA_FILE).is_file()
    assert json.loads((latest / "trainer_state.json").read_text())["epoch"] == 1
    monkeypatch.setattr(trainer, "ppo_update", real)
    ppo_main.run(cfg, reward_fn=vowel_fraction)

    a, b = _steps(straight), _steps(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    kl_coefs = [a[s]["ppo/kl_coef"] for s in sorted(a)]
    assert len(set(kl_coefs)) == 5  # the adaptive controller moved every step, and its value was restored
    for s in a:
        for k in a[s]:
            if not k.startswith(("time/", "throughput/")) and k not in ("time", "step"):
                assert b[s][k] == pytest.approx(a[s][k], abs=1e-5, rel=1e-4), (s, k)
    assert _evals(resumed)[-1]["eval/score_mean"] == pytest.approx(_evals(straight)[-1]["eval/score_mean"], abs=1e-6)
    assert [e["step"] for e in _evals(resumed)] == [0, 5]  # no second step-0 evaluation after the resume
    for name in ("actor", "actor_ema"):
        x = AutoModelForCausalLM.from_pretrained(straight / name).state_dict()
        y = AutoModelForCausalLM.from_pretrained(resumed / name).state_dict()
        assert all(torch.allclose(x[k], y[k], atol=1e-5) for k in x), name
    x = AutoModelForSequenceClassification.from_pretrained(straight / "critic").state_dict()
    y = AutoModelForSequenceClassification.from_pretrained(resumed / "critic").state_dict()
    assert all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)
    # The EMA is an average, not the actor itself.
    ema = AutoModelForCausalLM.from_pretrained(straight / "actor_ema").state_dict()
    actor = AutoModelForCausalLM.from_pretrained(straight / "actor").state_dict()
    assert any(not torch.allclose(ema[k], actor[k]) for k in actor)


# ------------------------------------------------------------------------------------ (d) LoRA

def test_lora_actor_uses_itself_without_adapters_as_reference(tiny_model_dir, prompts, tmp_path, monkeypatch):
    model = tiny_model_dir("llama")
    frozen = []
    real = ppo_main.build_frozen_model
    monkeypatch.setattr(ppo_main, "build_frozen_model",
                        lambda path, *a, **kw: frozen.append((path, kw["head"])) or real(path, *a, **kw))
    out = tmp_path / "lora"
    cfg = from_flat(PPOConfig, _flags(model, out, prompts, tmp_path / "cache", actor_lora_dim=4,
                                      only_optimize_lora=True, actor_zero_stage=2, critic_zero_stage=2,
                                      actor_lora_learning_rate=1e-2, max_steps=3))
    ppo_main.run(cfg, reward_fn=vowel_fraction)
    assert frozen == []  # no reference model loaded (and a reward function instead of a reward model)
    steps = _steps(out)
    kls = [steps[s]["objective/kl"] for s in sorted(steps)]
    # The adapters start at B = 0: the first rollout's policy is exactly the reference; then they train.
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and any(abs(k) > 1e-4 for k in kls[1:]), kls
    assert _evals(out)[0]["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    # Saved merged: plain transformers loads it, no adapter keys; the adapters changed only the blocks' Linears.
    base = AutoModelForCausalLM.from_pretrained(model).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out / "actor").state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".layers." in k and k.endswith("proj.weight") for k in changed), changed


# ------------------------------------------------------------------------------------ (e) refused settings

@pytest.mark.parametrize("flag,value,message", [
    ("inference_tp_size", 2, "--inference_tp_size > 1 is not supported"),
    ("tp_gather_partition_size", 0, "--tp_gather_partition_size must be at least 1"),
    ("enable_mixed_precision_lora", True, "--enable_mixed_precision_lora .* not supported"),
])
def test_unsupported_flags_are_refused(flag, value, message, capsys):
    with pytest.raises(ValueError, match=message):
        from_flat(PPOConfig, {flag: value})
    with pytest.raises(SystemExit):
        parse_config(PPOConfig, _argv({flag: value}))
    assert flag in capsys.readouterr().err


def test_more_generation_batches_than_an_epoch_holds_are_refused(tiny_model_dir, tmp_path):
    data = write_prompts(tmp_path / "small.jsonl", 32)  # 24 training prompts: 3 batches of 8
    cfg = from_flat(PPOConfig, _flags(tiny_model_dir("llama"), tmp_path / "out", data, tmp_path / "cache",
                                      generation_batches=4, per_device_training_batch_size=8))
    with pytest.raises(ValueError, match="--generation_batches 4 needs .* 24 training prompts make 3"):
        ppo_main.run(cfg, reward_fn=vowel_fraction)


def test_a_critic_with_another_tokenizer_is_refused(tiny_model_dir, prompts, tmp_path):
    actor = tiny_model_dir("llama")
    critic = tmp_path / "other-vocab"
    shutil.copytree(actor, critic)
    tok = AutoTokenizer.from_pretrained(critic)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(critic)
    cfg = from_flat(PPOConfig, _flags(actor, tmp_path / "out", prompts, tmp_path / "cache", critic=critic))
    with pytest.raises(ValueError, match=r"the critic .* must share the actor's tokenizer"):
        ppo_main.run(cfg)


# ------------------------------------------------------------------------------------ (f) reward tokenizer

def test_a_reward_model_with_another_tokenizer_scores_its_own_rendering(tiny_model_dir, prompts, tmp_path,
                                                                        monkeypatch):
    actor = tiny_model_dir("llama")                          # ChatML template, eos <|im_end|>
    reward = tiny_model_dir("gpt2", chat_template=False)     # "Human: ... Assistant:" form, eos </s>
    seen = []
    real = rewards.retokenize_for_reward
    monkeypatch.setattr(rewards, "retokenize_for_reward", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    out = tmp_path / "rm"
    cfg = from_flat(PPOConfig, _flags(actor, out, prompts, tmp_path / "cache", reward_model_name_or_path=str(reward)))
    ppo_main.run(cfg)
    steps = _steps(out)
    assert sorted(steps) == [1, 2] and all(math.isfinite(steps[s]["objective/scores"]) for s in steps)
    assert len(seen) == 2 + 2  # two training rollouts, one evaluation batch before and after
    reward_tok = AutoTokenizer.from_pretrained(reward)
    ids, mask = seen[0]
    text = reward_tok.decode(ids[0, :int(mask[0].sum())])
    assert text.startswith("\n\nHuman: ") and "\n\nAssistant:" in text and "<|im_start|>" not in text


# ------------------------------------------------------------------------------------ (g) pretraining mix

def test_pretraining_mix_adds_a_language_model_loss(tiny_model_dir, prompts, tmp_path):
    if not WIKI.is_file():
        pytest.skip(f"{WIKI} not found")
    out = tmp_path / "ptx"
    cfg = from_flat(PPOConfig, _flags(tiny_model_dir("llama"), out, prompts, tmp_path / "cache",
                                      unsupervised_dataset_name=str(WIKI), unsup_coef=0.5, generation_batches=2,
                                      reward_function="chatrlhf.training.step3_ppo.rewards:brevity"))
    ppo_main.run(cfg)
    steps = _steps(out)
    assert sorted(steps) == [1, 2]
    # A random model's LM loss is about ln(vocab) = 6.2 nats per token.
    assert all(5.0 < steps[s]["ppo/loss/ptx"] < 8.0 for s in steps), steps
    # brevity = 1 / (1 + words / 10) of a decoded answer: in (0, 1].
    assert all(0.0 < steps[s]["objective/scores"] <= 1.0 for s in steps)


def test_hybrid_engine_flags_choose_how_rollouts_gather():
    """DeepSpeed-Chat's knobs -> HybridEngine.generation: gathered at once by default, --tp_gather_partition_size
    layers at a time with --unpin_actor_parameters, plain per-module ZeRO-3 without the hybrid engine."""
    def mode(**flags):
        return from_flat(PPOConfig, flags).hybrid.generation_mode()

    assert mode() == dict(gather=True, release_cache=False, layers_per_gather=0)
    assert mode(unpin_actor_parameters=True, tp_gather_partition_size=4)["layers_per_gather"] == 4
    assert mode(enable_hybrid_engine=False)["gather"] is False
    assert mode(release_inference_cache=True)["release_cache"] is True
