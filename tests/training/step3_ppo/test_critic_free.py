"""Step 3 with group sampling and the critic-free estimators, end to end on tiny random models: a planted verifiable
task learned by grpo and rloo, no critic (or reference) loaded or saved when none is needed, dropout off by default,
two ranks (groups never split, metadata intact, statistics global), and the estimators in --help."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatrlhf.training import checkpoint
from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo import main as ppo_main
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.utils.config import from_flat
from chatrlhf.utils.logging import read_metrics

WORDS = "cat sat mat food car dog see then moon star bed hat pen ox".split()
pytestmark = pytest.mark.usefixtures("one_thread")


def write_task(path: Path, n: int, seed: int = 0) -> Path:
    """Prompts whose records carry the planted task's target letter and an id (metadata: no format reads them)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) + "?"
            f.write(json.dumps({"prompt": question, "chosen": "yes", "target": "e", "id": i, "question": question})
                    + "\n")
    return path


def letter_share(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """The planted verifiable task: the share of an answer's characters that are its record's target letter
    (about 0.06 for the random model)."""
    return [sum(c == m["target"] for c in r) / max(len(r), 1) for r, m in zip(responses, metadata)]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task") / "task.jsonl", 128)


def flags(model, out, data, cache, **extra) -> dict:
    f = dict(actor_model_name_or_path=str(model), critic_model_name_or_path=str(model), data_path=[str(data)],
             data_split="0,0,1", eval_fraction=0.25, dtype="fp32", output_dir=str(out), data_output_path=str(cache),
             max_prompt_seq_len=16, max_answer_seq_len=6, per_device_generation_batch_size=4,
             per_device_training_batch_size=16, per_device_eval_batch_size=16, ppo_epochs=2,
             actor_learning_rate=2e-3, lr_scheduler_type="constant", num_train_epochs=100, max_steps=2, eval_iters=2,
             seed=5, advantage_estimator="grpo", n_samples_per_prompt=4)
    f.update(extra)
    return f


def argv(f: dict) -> list[str]:
    out = []
    for k, v in f.items():
        if isinstance(v, bool):
            out += [f"--{k}"] if v else []
        else:
            out += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    return out


def steps_of(out) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "objective/scores" in m}


def evals_of(out) -> list[dict]:
    return [m for m in read_metrics(out) if "eval/score_mean" in m]


# ------------------------------------------------------------------------------------ learning

@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_planted_verifiable_task_is_learned(estimator, tiny_model_dir, task, tmp_path):
    """30 steps of 4 prompts x 8 answers, the target letter coming from each record's metadata; no critic, and
    --kl_coef 0: no reference either. The held-out share of the letter rises well above the random model's."""
    out = tmp_path / estimator
    cfg = from_flat(PPOConfig, flags(tiny_model_dir("llama"), out, task, tmp_path / "cache", max_steps=30,
                                     advantage_estimator=estimator, n_samples_per_prompt=8, kl_coef=0.0))
    final = ppo_main.run(cfg, reward_fn=letter_share)
    steps = steps_of(out)
    assert sorted(steps) == list(range(1, 31))
    for m in steps.values():
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
        assert m["objective/kl"] == 0.0 and "ppo/loss/value" not in m
    evals = evals_of(out)
    assert evals[0]["eval/score_mean"] < 0.1 and final["eval/score_mean"] > evals[0]["eval/score_mean"] + 0.12, evals
    scores = [steps[s]["objective/scores"] for s in sorted(steps)]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1, scores


# ------------------------------------------------------------------------------------ what is built

def test_critic_free_runs_build_no_critic_and_save_none(tiny_model_dir, task, tmp_path, monkeypatch):
    built, frozen = [], []
    real_trained, real_frozen = ppo_main.build_trained_model, ppo_main.build_frozen_model
    monkeypatch.setattr(ppo_main, "build_trained_model",
                        lambda *a, **kw: built.append(kw["head"]) or real_trained(*a, **kw))
    monkeypatch.setattr(ppo_main, "build_frozen_model",
                        lambda path, *a, **kw: frozen.append(kw["head"]) or real_frozen(path, *a, **kw))
    out = tmp_path / "rloo"
    extra = dict(advantage_estimator="rloo", kl_in_loss=True, kl_estimator="k3", max_steps=3, save_interval=2,
                 enable_ema=True, reward_function=["chatrlhf.training.step3_ppo.rewards:brevity"])
    ppo_main.run(from_flat(PPOConfig, flags(tiny_model_dir("llama"), out, task, tmp_path / "c", **extra)),
                 reward_fn=letter_share)
    assert built == ["causal_lm"]            # the actor only: no critic
    assert frozen == ["causal_lm"]           # the reference (for the KL in the loss); reward functions, no model
    assert not (out / "critic").exists() and (out / "actor").is_dir() and (out / "actor_ema").is_dir()
    saved = checkpoint.latest(out)
    assert saved.name == "step_2" and not any("critic" in p.name for p in saved.iterdir())
    steps = steps_of(out)
    assert all(steps[s]["ppo/loss/kl"] >= 0 for s in steps) and any(steps[s]["ppo/loss/kl"] > 0 for s in steps)
    # Two summed rewards (weights 1, 1), each logged on its own.
    m = steps[3]
    assert m["objective/scores"] == pytest.approx(m["objective/reward/brevity"] + m["objective/reward/letter_share"])
    assert "eval/reward/letter_share" in evals_of(out)[-1]

    # kl_coef 0: no reference model either; the run resumes from its critic-free checkpoint.
    built.clear(), frozen.clear()
    extra.update(kl_coef=0.0, max_steps=4)
    ppo_main.run(from_flat(PPOConfig, flags(tiny_model_dir("llama"), out, task, tmp_path / "c", resume_with_changes=True,
                                            **extra)), reward_fn=letter_share)
    assert built == ["causal_lm"] and frozen == []
    assert sorted(steps_of(out))[-1] == 4


@pytest.mark.parametrize("zero_stage, lora", [(1, False), (2, True), (3, False)])
def test_group_sampling_under_every_zero_stage(zero_stage, lora, tiny_model_dir, task, tmp_path):
    out = tmp_path / f"zero{zero_stage}"
    extra = dict(actor_zero_stage=zero_stage, max_steps=2, advantage_estimator="reinforce_pp_baseline",
                 kl_in_loss=True, kl_estimator="k3")
    if lora:
        extra.update(actor_lora_dim=4, only_optimize_lora=True, actor_lora_learning_rate=1e-2)
    ppo_main.run(from_flat(PPOConfig, flags(tiny_model_dir("llama"), out, task, tmp_path / "c", **extra)),
                 reward_fn=letter_share)
    steps = steps_of(out)
    assert sorted(steps) == [1, 2] and all(math.isfinite(steps[s]["ppo/loss/policy"]) for s in steps)
    assert AutoModelForCausalLM.from_pretrained(out / "actor") is not None and not (out / "critic").exists()


def test_dropout_is_off_in_step_3_so_the_first_ratio_is_one(tiny_model_dir, task, tmp_path):
    """OPT's config has dropout 0.1; old log-probs come from eval mode, so a training forward with dropout starts
    every update at a ratio that is not 1. Step 3 turns dropout off unless --actor_dropout asks for it."""
    model = tiny_model_dir("opt")
    assert AutoModelForCausalLM.from_pretrained(model).config.dropout == 0.1
    common = dict(advantage_estimator="gae", n_samples_per_prompt=1, per_device_generation_batch_size=8,
                  per_device_training_batch_size=8, ppo_epochs=1, max_steps=1, eval_iters=1)
    assert from_flat(PPOConfig, {}).actor.dropout == 0.0 and from_flat(PPOConfig, {}).critic.dropout == 0.0
    for dropout, exact in ((None, True), (0.1, False)):
        out = tmp_path / f"dropout{dropout}"
        extra = dict(common, **({} if dropout is None else {"actor_dropout": dropout}))
        ppo_main.run(from_flat(PPOConfig, flags(model, out, task, tmp_path / "c", **extra)), reward_fn=letter_share)
        m = steps_of(out)[1]  # one minibatch, one epoch: the policy is still the one that sampled
        if exact:
            assert m["ppo/policy/approxkl"] < 1e-10 and m["ppo/policy/ratio"] == pytest.approx(1.0, abs=1e-6), m
        else:
            assert m["ppo/policy/approxkl"] > 1e-5, m


def test_bad_settings_are_refused_at_parse_time():
    with pytest.raises(ValueError, match="needs --n_samples_per_prompt >= 2"):
        from_flat(PPOConfig, {"advantage_estimator": "grpo"})
    with pytest.raises(ValueError, match="not registered"):
        from_flat(PPOConfig, {"advantage_estimator": "ppo2"})
    with pytest.raises(ValueError, match="must be a multiple of --per_device_training_batch_size"):
        from_flat(PPOConfig, {"advantage_estimator": "rloo", "n_samples_per_prompt": 3,
                              "per_device_generation_batch_size": 2, "per_device_training_batch_size": 4})
    with pytest.raises(ValueError, match="--reward_weights: 1 weights for 2 rewards"):
        from_flat(PPOConfig, {"reward_function": ["a:b", "c:d"], "reward_weights": [1.0]})
    with pytest.raises(ValueError, match="multiple of --gradient_accumulation_steps"):
        from_flat(PPOConfig, {"per_device_generation_batch_size": 8, "per_device_training_batch_size": 4,
                              "gradient_accumulation_steps": 4})
    cfg = from_flat(PPOConfig, {"advantage_estimator": "dr_grpo", "n_samples_per_prompt": 2, "cliprange_high": 0.28})
    assert (cfg.ppo.loss_agg, cfg.ppo.whiten_advantages) == ("seq_mean_token_sum_norm", False)
    assert (cfg.ppo.cliprange_low, cfg.ppo.cliprange_high) == (0.2, 0.28)
    assert from_flat(PPOConfig, {}).ppo.whiten_advantages is True  # gae's default
    assert from_flat(PPOConfig, {"loss_agg": "seq_mean"}).ppo.loss_agg == "seq_mean_token_mean"  # the old name


def test_help_lists_every_estimator(tmp_path):
    text = subprocess.run([sys.executable, "-m", "chatrlhf.training.step3_ppo", "--help"], capture_output=True,
                          text=True, check=True, cwd=tmp_path).stdout
    for flag in ("--advantage_estimator", "--n_samples_per_prompt", "--kl_in_loss", "--cliprange_high",
                 "--reward_weights", "--loss_agg"):
        assert flag in text
    for name in core.ADVANTAGE_ESTIMATORS:
        assert name in text, name


# ------------------------------------------------------------------------------------ two ranks

RECORDING_REWARD = '''
import json, os

def reward(prompts, responses, metadata):
    with open(os.path.join(os.environ["RECORD_DIR"], "rank%s.jsonl" % os.environ["RANK"]), "a") as f:
        f.write(json.dumps({"prompts": prompts, "metadata": metadata}) + "\\n")
    return [sum(c == m["target"] for c in r) / max(len(r), 1) for r, m in zip(responses, metadata)]
'''


@pytest.mark.distributed
def test_two_ranks_zero3_lora_groups_stay_on_one_rank_with_their_metadata(tiny_model_dir, task, tmp_path,
                                                                          deepspeed_launch, monkeypatch):
    """grpo over 2 ZeRO-3 ranks, hybrid engine, LoRA with the adapters-off actor as the reference (KL in the
    loss): each rank's reward calls see its prompts' N answers side by side with their own records' metadata,
    and no prompt is answered on both ranks in one step."""
    (tmp_path / "recording_reward.py").write_text(RECORDING_REWARD)
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("RECORD_DIR", str(records))
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = tmp_path / "two"
    n, gen_bs = 4, 2
    f = flags(tiny_model_dir("llama"), out, task, tmp_path / "cache", actor_zero_stage=3, enable_hybrid_engine=True,
              deepspeed_config=str(zero3), per_device_generation_batch_size=gen_bs, per_device_training_batch_size=4,
              n_samples_per_prompt=n, kl_in_loss=True, kl_estimator="k3", actor_lora_dim=4, only_optimize_lora=True,
              actor_lora_learning_rate=1e-2, per_device_eval_batch_size=3, eval_iters=1, max_steps=3,
              reward_function=["recording_reward:reward"])
    deepspeed_launch("chatrlhf.training.step3_ppo", argv(f), timeout=500)
    assert not (out / "critic").exists() and (out / "actor").is_dir()
    assert sorted(steps_of(out)) == [1, 2, 3]
    calls = {rank: [json.loads(line) for line in (records / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)}
    training = {rank: [c for c in calls[rank] if len(c["metadata"]) == gen_bs * n] for rank in calls}
    assert len(training[0]) == len(training[1]) == 3  # one rollout per step on each rank
    by_id = {json.loads(line)["id"]: json.loads(line) for line in task.read_text().splitlines()}
    for step in range(3):
        ids = {}
        for rank in (0, 1):
            call = training[rank][step]
            for start in range(0, gen_bs * n, n):
                metas = call["metadata"][start:start + n]
                assert all(m == metas[0] for m in metas)  # a prompt's N answers side by side, one record
                record = by_id[metas[0]["id"]]
                assert metas[0] == {k: record[k] for k in ("target", "id", "question")}  # intact through the ranks
                assert all(record["question"] in p for p in call["prompts"][start:start + n])
            ids[rank] = {m["id"] for m in call["metadata"]}
            assert len(ids[rank]) == gen_bs
        assert not ids[0] & ids[1]  # no prompt (no group) on both ranks


GLOBAL_STATS_SCRIPT = '''
import json, sys
import torch
from chatrlhf.utils import distributed as dist
from chatrlhf.training.step3_ppo import experience
from chatrlhf.training.step3_ppo.controllers import RunningMoments
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.training.step3_ppo.rollout import Rollout
from chatrlhf.utils.config import from_flat

dist.init_distributed()
rank = dist.get_rank()
data_path, out_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
data = torch.load(data_path)
cfg = from_flat(PPOConfig, {"advantage_estimator": "reinforce_pp", "normalize_scores": True, "kl_coef": 0.0,
                            "score_clip": None})
moments = RunningMoments()
out = {}
for step, rows in enumerate(data["ranks"][rank]):
    mask = data["mask"][rows]
    r = Rollout(sequences=torch.zeros(len(rows), 6, dtype=torch.long), attention_mask=torch.ones(len(rows), 6),
                action_mask=mask, logprobs=torch.zeros(mask.shape), ref_logprobs=None, values=None,
                scores=data["scores"][rows], prompt_len=2)
    experience.shape_and_estimate(r, cfg, 0.0, moments)
    out[step] = r.advantages.tolist()
with open(out_dir + f"/rank{rank}.json", "w") as f:
    json.dump({"advantages": out, "moments": moments.state_dict()}, f)
dist.run_as_process(lambda: None)  # ends as a step's rank does: no interpreter teardown
'''


@pytest.mark.distributed
def test_score_moments_and_whitening_are_global_across_ranks(tmp_path, deepspeed_launch):
    """Two ranks whose scores differ in scale: each rank's advantages are whitened with every rank's mean and std,
    and every rank holds the same running score moments (the ones a checkpoint saves), as one process holding all
    the rows would."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(4) < torch.randint(1, 5, (16,), generator=g)[:, None]).float()
    scores = torch.cat([torch.randn(8, generator=g), 10 + 5 * torch.randn(8, generator=g)])
    ranks = {0: [list(range(0, 4)), list(range(4, 8))], 1: [list(range(8, 12)), list(range(12, 16))]}
    torch.save({"mask": mask, "scores": scores, "ranks": ranks}, tmp_path / "data.pt")
    script = tmp_path / "global_stats.py"
    script.write_text(GLOBAL_STATS_SCRIPT)
    deepspeed_launch(str(script), [str(tmp_path / "data.pt"), str(tmp_path)], timeout=300)
    got = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert got[0]["moments"] == pytest.approx(got[1]["moments"])

    from chatrlhf.training.step3_ppo import experience
    from chatrlhf.training.step3_ppo.controllers import RunningMoments
    from chatrlhf.training.step3_ppo.rollout import Rollout

    cfg = from_flat(PPOConfig, {"advantage_estimator": "reinforce_pp", "normalize_scores": True, "kl_coef": 0.0,
                                "score_clip": None})
    moments = RunningMoments()
    for step in range(2):
        rows = ranks[0][step] + ranks[1][step]  # one process, both ranks' rows of the step
        r = Rollout(sequences=torch.zeros(8, 6, dtype=torch.long), attention_mask=torch.ones(8, 6),
                    action_mask=mask[rows], logprobs=torch.zeros(8, 4), ref_logprobs=None, values=None,
                    scores=scores[rows], prompt_len=2)
        experience.shape_and_estimate(r, cfg, 0.0, moments)
        for rank in (0, 1):
            mine = torch.tensor(got[rank]["advantages"][str(step)])
            torch.testing.assert_close(mine, r.advantages[4 * rank:4 * rank + 4], atol=1e-5, rtol=0)
    assert got[0]["moments"] == pytest.approx(moments.state_dict())
