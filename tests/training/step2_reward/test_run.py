"""Step 2 end to end on tiny random models: learning a planted preference, plain-transformers reload, rw_eval,
LoRA, resume after a kill, every family, and two ZeRO-3 ranks against one process."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from chatrlhf.training import checkpoint
from chatrlhf.training.data.pipeline import load_phase_data
from chatrlhf.training.step2_reward import main as rm_main
from chatrlhf.training import reward_model
from chatrlhf.training.step2_reward import rw_eval, trainer
from chatrlhf.training.step2_reward.data import REWARD_DATA, PairCollator
from chatrlhf.training.step2_reward.config import RewardConfig
from chatrlhf.training.value_model import end_scores, token_values
from chatrlhf.utils.config import from_flat, load_config, parse_config
from chatrlhf.utils.logging import read_metrics
from chatrlhf.utils.models import load_tokenizer

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


def _flags(model_dir, out, data, cache, **extra) -> dict:
    flags = dict(model_name_or_path=str(model_dir), data_path=[str(data)], data_split="0,1,0", eval_fraction=0.2,
                 dtype="fp32", output_dir=str(out), data_output_path=str(cache), max_seq_len=48,
                 per_device_train_batch_size=16, per_device_eval_batch_size=40, learning_rate=3e-3,
                 lr_scheduler_type="constant", eval_iters=10, eval_interval=0, seed=3)
    flags.update(extra)
    return flags


def _evals(out, key="eval/accuracy") -> list[float]:
    return [m[key] for m in read_metrics(out) if key in m]


def _train_losses(out) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}


def _hf_pair_scores(model_dir, cfg: RewardConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) end scores of every held-out pair from the saved model loaded by plain transformers,
    plus the same scores read by our token_values/end_scores."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_phase_data(cfg.data, REWARD_DATA, tok, seed=cfg.train.seed, max_seq_len=cfg.train.max_seq_len)
    batch = PairCollator(tok)([data.eval[i] for i in range(len(data.eval))])  # right-padded, [2B, T]
    with torch.no_grad():
        hf = model(**batch).logits.squeeze(-1)
        ours = end_scores(token_values(model, batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    half = hf.numel() // 2
    return hf[:half], hf[half:], ours


@pytest.fixture(scope="module")
def planted_run(tiny_model_dir, planted, tmp_path_factory):
    """A tiny llama trained on the planted preference (shared by the tests that read its output)."""
    tmp = tmp_path_factory.mktemp("rm")
    out = tmp / "rm"
    cfg = from_flat(RewardConfig, _flags(tiny_model_dir("llama"), out, planted, tmp / "cache", max_steps=60,
                                         num_train_epochs=3, eval_interval=20))
    metrics = rm_main.run(cfg)
    return cfg, out, metrics


def test_planted_marker_is_learned_to_over_95_percent_held_out(planted_run, tiny_model_dir):
    cfg, out, metrics = planted_run
    # The cue is the marker alone: both answers of every pair have the same number of tokens.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    assert len(tok.tokenize(" " + MARKER)) == 2 and all(len(tok.tokenize(" " + w)) == 2 for w in WORDS)
    accuracy = _evals(out)
    assert accuracy[0] < 0.8, accuracy  # a random head does not know the marker
    assert metrics["eval/accuracy"] > 0.95 and metrics["eval/pairs"] == 80, metrics
    assert metrics["eval/chosen_score"] > metrics["eval/rejected_score"]
    assert metrics["eval/margin"] == pytest.approx(metrics["eval/chosen_score"] - metrics["eval/rejected_score"])
    # Evaluated before training, every --eval_interval steps and at the end.
    assert [m["step"] for m in read_metrics(out) if "eval/accuracy" in m] == [0, 20, 40, 60]
    assert all(k in m for m in read_metrics(out) if "train/loss" in m for k in ("train/accuracy", "train/margin"))


def test_saved_model_loads_in_plain_transformers_with_the_same_scores(planted_run):
    cfg, out, metrics = planted_run
    chosen, rejected, ours = _hf_pair_scores(out, cfg)
    # HF pools the last non-pad token; we read the last attention_mask == 1 token: the same on right padding (to
    # fp32 rounding: our forward is padding-free, training/packing.py).
    torch.testing.assert_close(ours, torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-6)
    # ...and they are the scores the trainer evaluated before saving.
    assert (chosen > rejected).float().mean().item() == pytest.approx(metrics["eval/accuracy"])
    assert chosen.mean().item() == pytest.approx(metrics["eval/chosen_score"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(metrics["eval/rejected_score"], abs=1e-4)
    hf_config = AutoModelForSequenceClassification.from_pretrained(out).config
    tok = AutoTokenizer.from_pretrained(out)
    assert hf_config.num_labels == 1 and hf_config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert load_config(RewardConfig, out) == cfg


def test_rw_eval_scores_answers_from_the_command_line_and_files(planted_run, tmp_path, capsys):
    _, out, _ = planted_run
    model, tok = reward_model.load_reward_model(str(out))
    good, bad = reward_model.score_texts(model, tok, "cat dog?", ["moon fig bed hat", "moon pen bed hat"])
    assert good > bad

    results = rw_eval.main(["--model_name_or_path", str(out), "--prompt", "cat dog?",
                            "--answers", "moon fig bed hat", "moon pen bed hat"])
    assert [r["scores"] for r in results] == [pytest.approx([good, bad], abs=1e-5)]
    assert "moon fig bed hat" in capsys.readouterr().out

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "see car?", "chosen": "fig hat", "rejected": "pen hat"}) + "\n"
                     + json.dumps({"prompt": "\n\nHuman: ox?\n\nAssistant:", "chosen": "star fig",
                                   "rejected": "star bed"}) + "\n")
    lists = tmp_path / "lists.jsonl"
    lists.write_text(json.dumps({"prompt": [{"role": "user", "content": "cat dog?"}],
                                 "answers": ["moon fig bed hat", "moon pen bed hat", "fig"]}) + "\n")
    scores_file = tmp_path / "scores.jsonl"
    rw_eval.main(["--model_name_or_path", str(out), "--input_file", str(pairs), "--output_file", str(scores_file)])
    assert "pairwise accuracy: 1.0000 (2 of 2" in capsys.readouterr().out
    written = [json.loads(line) for line in scores_file.read_text().splitlines()]
    assert [r["chosen_wins"] for r in written] == [True, True]
    listed = rw_eval.main(["--model_name_or_path", str(out), "--input_file", str(lists)])
    assert listed[0]["scores"][:2] == pytest.approx([good, bad], abs=1e-5)  # same rendering for all prompt forms


def test_rw_eval_refuses_a_model_without_a_trained_head(tiny_model_dir):
    with pytest.raises(ValueError, match="no trained score head"):
        reward_model.load_reward_model(str(tiny_model_dir("llama")))
    with pytest.raises(SystemExit):
        rw_eval.main(["--model_name_or_path", "x", "--prompt", "p"])  # no answers


def test_flags_defaults_and_ds_chat_compatibility():
    cfg = parse_config(RewardConfig, ["--num_padding_at_beginning", "1", "--compute_fp32_loss", "--margin", "0.5",
                                      "--center_coef", "0.01", "--zero_stage", "3", "--eval_iters", "5"])
    assert cfg.optim.learning_rate == 5e-5 and cfg.train.output_dir == "output/step2_reward"
    assert cfg.train.eval_interval == 100 and cfg.dschat.num_padding_at_beginning == 1 and cfg.margin == 0.5
    assert cfg.center_coef == 0.01 and cfg.model.zero_stage == 3 and cfg.engine.compute_fp32_loss
    with pytest.raises(SystemExit):
        parse_config(RewardConfig, ["--center_coef", "-1"])
    with pytest.raises(SystemExit):
        parse_config(RewardConfig, ["--help"])


def test_margin_and_centring_reach_the_loss(tiny_model_dir, planted, tmp_path, monkeypatch):
    seen = {}
    real = trainer.pairwise_loss

    def spy(chosen, rejected, margin, center_coef):
        seen.update(margin=margin, center_coef=center_coef)
        return real(chosen, rejected, margin, center_coef)

    monkeypatch.setattr(trainer, "pairwise_loss", spy)
    rm_main.run(from_flat(RewardConfig, _flags(tiny_model_dir("llama"), tmp_path / "m", planted, tmp_path / "c",
                                               max_steps=1, margin=0.5, center_coef=0.01)))
    assert seen == {"margin": 0.5, "center_coef": 0.01}


def test_length_debias_fits_length_on_the_training_pairs_and_puts_it_in_each_margin(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    rng = random.Random(0)
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:  # the shorter answer is chosen in about 3 pairs of 4
        for i in range(80):
            short, long = " ".join(rng.choice(WORDS) for _ in range(2)), " ".join(rng.choice(WORDS) for _ in range(6))
            chosen, rejected = (short, long) if i % 4 else (long, short)
            f.write(json.dumps({"prompt": "why?", "chosen": chosen, "rejected": rejected}) + "\n")
    seen = []
    real = trainer.pairwise_loss

    def spy(chosen, rejected, margin, center_coef):
        seen.append(margin)
        return real(chosen, rejected, margin, center_coef)

    monkeypatch.setattr(trainer, "pairwise_loss", spy)
    cfg = from_flat(RewardConfig, _flags(tiny_model_dir("llama"), tmp_path / "m", path, tmp_path / "c", max_steps=2,
                                         margin=0.25, length_debias=True, per_device_train_batch_size=8))
    rm_main.run(cfg)
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    train = load_phase_data(cfg.data, REWARD_DATA, tok, seed=cfg.train.seed, max_seq_len=cfg.train.max_seq_len).train
    slope = trainer.training_length_slope(train)
    diff = [len(r) - len(c) for c, r in zip(train["chosen_input_ids"], train["rejected_input_ids"])]
    wins = sum(d > 0 for d in diff) / sum(d != 0 for d in diff)
    assert 0.6 < wins < 0.9 and slope > 0  # shorter wins: a positive slope
    assert len(seen) == 2 and all(torch.is_tensor(m) and m.shape == (8,) for m in seen)
    # each pair's margin: --margin plus slope x (chosen - rejected length); the chosen-shorter pairs' is lower
    first = PairCollator(tok)([train[i] for i in range(len(train))])  # lengths as the collator counts them
    lc, lr = first["answer_lengths"].double().chunk(2)
    possible = {round(float(v), 5) for v in 0.25 + slope * (lc - lr)}
    assert all(round(float(v), 5) in possible for m in seen for v in m)
    assert {round(float(v), 5) for m in seen for v in m} != {0.25}


def test_lora_only_trains_adapters_and_head_and_saves_a_loadable_model(tiny_model_dir, planted, tmp_path):
    base_dir = tiny_model_dir("llama")
    out = tmp_path / "lora"
    cfg = from_flat(RewardConfig, _flags(base_dir, out, planted, tmp_path / "c", lora_dim=8, only_optimize_lora=True,
                                         lora_learning_rate=1e-2, learning_rate=1e-2, max_steps=40))
    metrics = rm_main.run(cfg)
    assert metrics["eval/accuracy"] > _evals(out)[0] + 0.2, _evals(out)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1).state_dict()
    merged = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    assert set(merged) == set(base)
    changed = {k for k in base if k != "score.weight" and not torch.equal(base[k], merged[k])}
    # Merged adapters change Linear weights in the blocks only; embeddings and norms stayed frozen.
    assert changed and all(".layers." in k and k.endswith("proj.weight") for k in changed), changed
    chosen, rejected, _ = _hf_pair_scores(out, cfg)
    assert chosen.mean().item() == pytest.approx(metrics["eval/chosen_score"], abs=1e-4)
    assert (chosen > rejected).float().mean().item() == pytest.approx(metrics["eval/accuracy"])


class Crash(RuntimeError):
    pass


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tiny_model_dir, planted, tmp_path, monkeypatch):
    model = tiny_model_dir("llama")
    flags = dict(max_steps=6, save_interval=2, dropout=0.1, per_device_train_batch_size=8)  # dropout: RNG restored
    straight = tmp_path / "straight"
    rm_main.run(from_flat(RewardConfig, _flags(model, straight, planted, tmp_path / "c", **flags)))

    resumed = tmp_path / "resumed"
    cfg = from_flat(RewardConfig, _flags(model, resumed, planted, tmp_path / "c", **flags))
    real_loss, calls = trainer.reward_loss, {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the step-4 checkpoint
            raise Crash("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "reward_loss", crashing_loss)
    with pytest.raises(Crash):
        rm_main.run(cfg)
    assert checkpoint.latest(resumed).name == "step_4"
    monkeypatch.setattr(trainer, "reward_loss", real_loss)
    rm_main.run(cfg)

    assert _train_losses(resumed) == pytest.approx(_train_losses(straight), abs=1e-5)
    assert _evals(resumed, "eval/loss")[-1] == pytest.approx(_evals(straight, "eval/loss")[-1], abs=1e-5)
    a = AutoModelForSequenceClassification.from_pretrained(straight).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(resumed).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("family", ["opt", "gpt2", "qwen2", "gpt_neox", "bloom"])
def test_every_family_trains_and_reloads(family, tiny_model_dir, planted, tmp_path):
    out = tmp_path / family
    cfg = from_flat(RewardConfig, _flags(tiny_model_dir(family, chat_template=family != "opt"), out, planted,
                                         tmp_path / "c", max_steps=2, eval_iters=1))
    metrics = rm_main.run(cfg)
    chosen, rejected, ours = _hf_pair_scores(out, cfg)
    torch.testing.assert_close(ours, torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-5)
    assert chosen[:40].mean().item() == pytest.approx(metrics["eval/chosen_score"], abs=1e-4)


def test_real_hh_rlhf_pairs(tiny_model_dir, hh_rlhf_sample, tmp_path):
    path = hh_rlhf_sample(64, tmp_path)
    out = tmp_path / "rm"
    metrics = rm_main.run(from_flat(RewardConfig, _flags(tiny_model_dir("llama"), out, path, tmp_path / "c",
                                                         max_steps=2, max_seq_len=128, skip_malformed=True,
                                                         per_device_train_batch_size=4)))
    assert metrics["eval/pairs"] > 0 and len(_train_losses(out)) == 2


def test_script_form_runs_as_in_deepspeed_chat(tiny_model_dir, planted, tmp_path):
    """`python training/step2_reward/main.py ...`: the file run directly, as DeepSpeed-Chat users launch it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "script"
    flags = _flags(tiny_model_dir("llama"), out, planted, tmp_path / "c", max_steps=1, eval_iters=1)
    argv = [a for k, v in flags.items() for a in (f"--{k}", *(v if isinstance(v, list) else [v]))]
    # In-process runs earlier in this session joined a one-rank group through these; the child makes its own.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "training" / "step2_reward" / "main.py"), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (out / "model.safetensors").is_file() and len(_train_losses(out)) == 1


@pytest.mark.distributed
def test_two_ranks_zero3_match_one_process(tiny_model_dir, planted, tmp_path, deepspeed_launch):
    model = tiny_model_dir("llama")
    extra = dict(max_steps=5, center_coef=0.01, margin=0.1, per_device_eval_batch_size=20, eval_iters=4)
    one = tmp_path / "one"
    rm_main.run(from_flat(RewardConfig, _flags(model, one, planted, tmp_path / "c", per_device_train_batch_size=4,
                                               **extra)))
    two = tmp_path / "two"
    flags = _flags(model, two, planted, tmp_path / "c", per_device_train_batch_size=2, zero_stage=3, **extra)
    argv = []
    for k, v in flags.items():
        argv += [f"--{k}", *(v if isinstance(v, list) else [v])]
    deepspeed_launch("chatrlhf.training.step2_reward", argv)
    assert list(_train_losses(two)) == [1, 2, 3, 4, 5]
    assert _train_losses(two) == pytest.approx(_train_losses(one), abs=2e-4)
    for key in ("eval/loss", "eval/accuracy", "eval/chosen_score"):
        assert _evals(two, key)[-1] == pytest.approx(_evals(one, key)[-1], abs=2e-4)
    # The ZeRO-3 shards were gathered into one plain model that scores like the one-process model. (Weights agree
    # to ~1e-4 only: Adam's g / sqrt(v) magnifies float-order noise in near-zero gradients.)
    a = AutoModelForSequenceClassification.from_pretrained(one).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(two).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)
    cfg = load_config(RewardConfig, two)
    torch.testing.assert_close(_hf_pair_scores(two, cfg)[2], _hf_pair_scores(one, cfg)[2], atol=5e-4, rtol=1e-3)


def test_no_evaluation_before_training_when_asked(tiny_model_dir, planted, tmp_path):
    """--eval_before_training false: one evaluation, after training; the pipeline's summary then has no "before"."""
    from chatrlhf.training.pipeline.report import key_metrics

    out = tmp_path / "m"
    rm_main.run(from_flat(RewardConfig, _flags(tiny_model_dir("llama"), out, planted, tmp_path / "c", max_steps=2,
                                               eval_before_training=False)))
    assert [m["step"] for m in read_metrics(out) if "eval/accuracy" in m] == [2]
    before, after = key_metrics("step2_reward", out)["eval/accuracy"]
    assert before is None and after == _evals(out)[-1]


def test_heldout_scores_the_pairs_step_2_held_out_as_step_2_did(planted_run, tmp_path, capsys):
    from chatrlhf.training.step2_reward import heldout

    cfg, out, metrics = planted_run
    with pytest.raises(ValueError, match="step 2's own share"):
        heldout.main(["--model_name_or_path", str(out), "--shares", "1"])
    rows_file = tmp_path / "rows.jsonl"
    result = heldout.main(["--model_name_or_path", str(out), "--shares", "--dtype", "fp32",
                           "--output_file", str(rows_file)])
    # The same 80 pairs, split as step 2 split them, scored alike.
    assert result["pairs"] == metrics["eval/pairs"] == 80
    assert result["accuracy"] == pytest.approx(metrics["eval/accuracy"])
    assert result["shorter_wins"] == pytest.approx(metrics["eval/shorter_wins"])
    assert result["length_controlled_pairs"] == metrics["eval/length_controlled_pairs"] > 70
    assert result["accuracy_length_controlled"] == pytest.approx(metrics["eval/accuracy_length_controlled"])
    assert "80 unseen pairs" in capsys.readouterr().out
    same = heldout.main(["--model_name_or_path", str(out), "--shares", "--dtype", "fp32",
                         "--baseline_file", str(rows_file)])
    assert same["accuracy_diff"] == 0 and same["accuracy_diff_se"] == 0


def test_heldout_shares_score_every_unseen_pair_as_the_heldout_command_does(tiny_model_dir, planted, tmp_path):
    """--heldout_shares 2: after training, step 2 scores its eval split and all of share 2 as one set (heldout/*,
    with standard errors), the same figures `step2_reward.heldout` gives on the saved model."""
    from chatrlhf.training.pipeline.report import key_metrics
    from chatrlhf.training.step2_reward import heldout

    model = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="--heldout_shares.*step 2's own share"):
        rm_main.run(from_flat(RewardConfig, _flags(model, tmp_path / "no", planted, tmp_path / "c",
                                                   heldout_shares=[1])))
    assert not (tmp_path / "no").exists()  # refused before anything was written
    out = tmp_path / "rm"
    metrics = rm_main.run(from_flat(RewardConfig, _flags(model, out, planted, tmp_path / "c", data_split="0,1,1",
                                                         max_steps=3, heldout_shares=[2])))
    assert metrics["eval/pairs"] == 40 and metrics["heldout/pairs"] == 40 + 200
    command = heldout.main(["--model_name_or_path", str(out), "--shares", "2", "--dtype", "fp32",
                            "--batch_size", "40"])
    assert command["pairs"] == metrics["heldout/pairs"]
    for key in ("accuracy", "accuracy_se", "shorter_wins", "accuracy_length_controlled",
                "accuracy_length_controlled_se"):
        assert metrics[f"heldout/{key}"] == pytest.approx(command[key], abs=1e-9), key
    assert metrics["heldout/length_controlled_pairs"] == command["length_controlled_pairs"]
    # Logged once, at the last step; the pipeline's summary reads it with its standard error.
    assert [m["step"] for m in read_metrics(out) if "heldout/accuracy" in m] == [3]
    shown = key_metrics("step2_reward", out)
    assert shown["heldout/accuracy"] == [None, metrics["heldout/accuracy"]]
    assert shown["heldout/accuracy_se"] == [None, metrics["heldout/accuracy_se"]]
