"""Rollouts (chatrlhf.training.step3_ppo.rollout, experience.make_rollout / shape_and_estimate): masks, batching,
score placement, re-tokenisation for a reward model with another tokenizer, eval-mode scoring, every sampled row
kept, groups of answers with their prompts' metadata, and the scores learned from."""
from __future__ import annotations

import copy

import pytest
import torch

from chatrlhf.training.data.render import encode_prompt, encode_response
from chatrlhf.training.hybrid_engine import build_engine
from chatrlhf.training.step3_ppo import core, experience, trainer
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.training.step3_ppo.controllers import RunningMoments
from chatrlhf.training.step3_ppo.rewards import FunctionReward, retokenize_for_reward
from chatrlhf.training.step3_ppo.rollout import Rollout, concat, generate, response_mask, score
from chatrlhf.utils.config import from_flat
from chatrlhf.utils.models import load_model, load_tokenizer

EOS = 9


pytestmark = pytest.mark.usefixtures("one_thread")


def with_pad(tokenizer):
    """The fixtures' tokenizers have no pad token; load_tokenizer's policy picks the unk/bos token."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.unk_token
    return tok


# ------------------------------------------------------------------------------------ masks and batching

def test_response_mask_counts_up_to_and_including_the_first_eos():
    responses = torch.tensor([[5, 6, EOS, 7, EOS],   # EOS in the middle: the tokens after it are padding
                              [EOS, 1, 1, 1, 1],     # an empty answer: just the EOS
                              [5, 6, 7, 8, 4],       # no EOS (hit the length limit)
                              [5, 6, 7, 8, EOS]])    # EOS last
    mask, has_eos = response_mask(responses, EOS)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False, True]


def rollout(B: int, P: int, R: int, seed: int, lengths: list[int]) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    action_mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # a left-padded prompt
    return Rollout(sequences=torch.randint(10, 100, (B, P + R), generator=g),
                   attention_mask=torch.cat([prompt_mask, action_mask.long()], 1), action_mask=action_mask,
                   logprobs=-torch.rand(B, R, generator=g), ref_logprobs=-torch.rand(B, R, generator=g),
                   values=torch.randn(B, R, generator=g), scores=torch.randn(B, generator=g), prompt_len=P)


def test_select_takes_the_same_rows_of_every_tensor():
    r = rollout(4, 3, 5, 0, [5, 2, 1, 4])
    r.advantages = torch.randn(4, 5)
    mb = r.select(torch.tensor([3, 1]))
    assert mb.prompt_len == 3 and mb.returns is None and mb.rewards is None
    for name in ("sequences", "attention_mask", "action_mask", "logprobs", "ref_logprobs", "values", "advantages"):
        assert torch.equal(getattr(mb, name), getattr(r, name)[[3, 1]]), name
    assert torch.equal(mb.scores, r.scores[[3, 1]]) and torch.equal(mb.responses, r.responses[[3, 1]])


def test_concat_repads_prompts_on_the_left_and_responses_on_the_right():
    a, b = rollout(2, 3, 5, 0, [5, 2]), rollout(3, 6, 2, 1, [1, 2, 2])
    assert concat([a], pad_id=0) is a
    c = concat([a, b], pad_id=0)
    assert c.prompt_len == 6 and c.sequences.shape == (5, 11) and c.attention_mask.shape == (5, 11)
    for name in ("action_mask", "logprobs", "ref_logprobs", "values"):
        assert getattr(c, name).shape == (5, 5), name
    assert c.scores.tolist() == a.scores.tolist() + b.scores.tolist()
    # a's prompts moved right by 3 (left padding), its responses stay aligned at the prompt boundary.
    assert torch.equal(c.sequences[:2, 3:], a.sequences) and (c.sequences[:2, :3] == 0).all()
    assert torch.equal(c.attention_mask[:2, 3:], a.attention_mask) and (c.attention_mask[:2, :3] == 0).all()
    assert torch.equal(c.responses[:2], a.responses)
    # b's responses padded on the right: masked out, zero log-probs and values there.
    assert torch.equal(c.sequences[2:, :8], b.sequences) and torch.equal(c.responses[2:, :2], b.responses)
    assert (c.action_mask[2:, 2:] == 0).all() and (c.attention_mask[2:, 8:] == 0).all()
    assert (c.values[2:, 2:] == 0).all() and (c.logprobs[2:, 2:] == 0).all()
    assert torch.equal(c.action_mask[2:, :2], b.action_mask) and torch.equal(c.values[2:, :2], b.values)


def test_the_score_lands_on_each_rows_last_counted_token():
    cfg = from_flat(PPOConfig, {"kl_coef": 0.0, "score_clip": None, "whiten_advantages": False, "lam": 1.0})
    r = rollout(4, 3, 5, 0, [3, 1, 5, 5])
    stats = experience.shape_and_estimate(r, cfg, kl_coef=0.0, moments=None)
    expected = torch.zeros(4, 5)
    for row, last in enumerate([2, 0, 4, 4]):
        expected[row, last] = r.scores[row]
    torch.testing.assert_close(r.rewards, expected)
    assert (r.advantages[r.action_mask == 0] == 0).all() and (r.returns[r.action_mask == 0] == 0).all()
    # gamma = lam = 1, no KL: every counted token's return is the row's score.
    torch.testing.assert_close(r.returns, r.scores[:, None] * r.action_mask)
    assert stats["ppo/response_length"].item() == pytest.approx(3.5)
    assert stats["objective/scores"].item() == pytest.approx(r.scores.mean().item())

    # With a KL penalty the score still sits at the last token, the penalty on every counted token.
    r = rollout(4, 3, 5, 0, [3, 1, 5, 5])
    cfg = from_flat(PPOConfig, {"kl_coef": 0.1, "score_clip": None})
    experience.shape_and_estimate(r, cfg, kl_coef=0.1, moments=None)
    kl = (r.logprobs - r.ref_logprobs) * r.action_mask
    torch.testing.assert_close(r.rewards, expected - 0.1 * kl)


# ------------------------------------------------------------------------------------ re-tokenisation

def test_retokenize_for_reward_gives_the_reward_tokenizers_own_rendering(tokenizer, plain_tokenizer):
    actor_tok, reward_tok = with_pad(tokenizer), with_pad(plain_tokenizer)  # ChatML (eos <|im_end|>) vs plain
    messages = [[{"role": "user", "content": "how are you?"}], [{"role": "user", "content": "the quick fox"}]]
    answers = ["I am fine, thanks.", "jumps over the lazy dog"]
    rows = [encode_response(actor_tok, answers[0]),                  # ends with the actor's EOS
            encode_response(actor_tok, answers[1])[:-1]]             # cut at the length limit: no EOS
    R = max(map(len, rows)) + 2
    responses = torch.tensor([r + [actor_tok.pad_token_id] * (R - len(r)) for r in rows])
    action_mask, has_eos = response_mask(responses, actor_tok.eos_token_id)
    ids, mask = retokenize_for_reward(messages, responses, action_mask, has_eos, actor_tok, reward_tok,
                                      torch.device("cpu"))
    expected = [encode_prompt(reward_tok, messages[0]) + encode_response(reward_tok, answers[0]),
                encode_prompt(reward_tok, messages[1]) + encode_response(reward_tok, answers[1])[:-1]]
    for row, want in enumerate(expected):
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == want and (mask[row, n:] == 0).all()  # right-padded
    text = reward_tok.decode(ids[0, :int(mask[0].sum())])
    assert text == "\n\nHuman: how are you?\n\nAssistant: I am fine, thanks.</s>"
    assert "<|im_start|>" not in text and reward_tok.eos_token_id not in ids[1, :int(mask[1].sum())].tolist()


# ------------------------------------------------------------------------------------ scoring and make_rollout

@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """Actor and critic with dropout 0.5 (ZeRO 0), a frozen reference: HybridEngines as the trainer builds them."""
    path = str(tiny_model_dir("llama"))
    tok = load_tokenizer(path, padding_side="left")

    def engine(head, trainable, dropout):
        model = load_model(path, tok, head=head, dropout=dropout)
        return build_engine(model, zero_stage=0, dtype="fp32", micro_batch_size=2, learning_rate=1e-3,
                            trainable=trainable)

    return dict(tok=tok, actor=engine("causal_lm", True, 0.5), critic=engine("score", True, 0.5),
                ref=engine("causal_lm", False, 0.0))


def test_old_logprobs_and_values_are_computed_without_dropout(models):
    tok, actor, critic, ref = models["tok"], models["actor"], models["critic"], models["ref"]
    enc = tok(["hello there", "The quick brown fox"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    sequences, action_mask, _ = generate(actor, enc["input_ids"], enc["attention_mask"], tokenizer=tok,
                                         sampling=dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0),
                                         max_new_tokens=6)
    passes = []
    for _ in range(2):
        actor.train()
        critic.train()
        passes.append(score(actor, ref, critic, sequences, enc["attention_mask"], action_mask, temperature=1.0))
    for key in ("logprobs", "ref_logprobs", "values"):
        assert torch.equal(passes[0][key], passes[1][key]), key
    assert passes[0]["logprobs"].shape == action_mask.shape == passes[0]["values"].shape
    # ...while in training mode the same forward is noisy: dropout 0.5 is really there.
    actor.train()
    mask = torch.cat([enc["attention_mask"], action_mask.long()], 1)
    with torch.no_grad():
        a, b = (actor(input_ids=sequences, attention_mask=mask).logits for _ in range(2))
    assert not torch.equal(a, b)


def test_make_rollout_keeps_every_row_and_masks_short_and_unfinished_answers(models):
    """Row 0 answers with EOS at once (empty answer), row 1 never emits EOS: both stay, with the right masks."""
    tok, actor = copy.deepcopy(models["tok"]), models["actor"]
    enc = tok(["hello there", "The quick brown fox"], return_tensors="pt", padding=True)
    R = 5
    with actor.generation() as gen:
        free = gen(enc["input_ids"], enc["attention_mask"], max_new_tokens=R, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, do_sample=False)[:, enc["input_ids"].size(1):]
    first = int(free[0, 0])
    assert first not in free[1].tolist(), free  # the random model's greedy rows differ
    # Make row 0's first greedy token the EOS: row 0's answer is just the EOS, row 1 reaches the limit.
    tok.eos_token = tok.convert_ids_to_tokens(first)
    assert tok.eos_token_id == first != tok.pad_token_id
    seen = {}

    def reward(prompts, responses):
        seen.update(prompts=prompts, responses=responses)
        return [1.0, 2.0]

    m = trainer.Models(actor=actor, critic=models["critic"], ref=models["ref"], reward=FunctionReward(reward),
                       tokenizer=tok)
    cfg = from_flat(PPOConfig, {"max_answer_seq_len": R, "do_sample": False, "missing_eos_penalty": -3.0})
    timings = {}
    r = experience.make_rollout(m, enc, cfg, timings)
    P = enc["input_ids"].size(1)
    assert r.sequences.shape == (2, P + R) and r.prompt_len == P
    for name in ("action_mask", "logprobs", "ref_logprobs", "values"):
        assert getattr(r, name).shape == (2, R), name
    assert r.action_mask.tolist() == [[1, 0, 0, 0, 0], [1] * R]
    assert torch.equal(r.attention_mask, torch.cat([enc["attention_mask"], r.action_mask.long()], 1))
    assert len(seen["prompts"]) == len(seen["responses"]) == 2  # the reward function saw both answers
    assert r.scores.tolist() == [1.0, 2.0] and r.has_eos.tolist() == [True, False]  # as scored
    assert set(timings) == {"generation", "scoring"}
    stats = experience.shape_and_estimate(r, cfg, kl_coef=cfg.ppo.kl_coef, moments=None)
    # The EOS-less answer learns from --missing_eos_penalty instead of its score, at its last token.
    # (the actor is still the reference: no KL penalty)
    torch.testing.assert_close(r.rewards.sum(1), torch.tensor([1.0, -3.0]), atol=1e-5, rtol=0)
    assert r.rewards[1, R - 1].item() == pytest.approx(-3.0, abs=1e-5)
    assert stats["objective/learned_scores"].item() == pytest.approx((1.0 - 3.0) / 2)
    assert stats["ppo/response_length"].item() == pytest.approx((1 + R) / 2)
    assert torch.isfinite(r.advantages).all() and (r.advantages[0, 1:] == 0).all()


# ------------------------------------------------------------------------------------ groups and learned scores

def test_each_prompt_gets_n_answers_in_one_group_with_its_own_metadata(models):
    tok, actor = models["tok"], models["actor"]
    enc = tok(["hello there", "The quick brown fox"], return_tensors="pt", padding=True)
    batch = {**enc, "metadata": [{"answer": "1"}, {"answer": "2"}],
             "prompt_messages": [[{"role": "user", "content": "hello there"}],
                                 [{"role": "user", "content": "The quick brown fox"}]]}
    seen = {}

    def reward(prompts, responses, metadata):
        seen.update(prompts=prompts, metadata=metadata)
        return [float(m["answer"]) for m in metadata]

    m = trainer.Models(actor=actor, critic=None, ref=models["ref"], reward=FunctionReward(reward), tokenizer=tok)
    cfg = from_flat(PPOConfig, {"max_answer_seq_len": 4, "advantage_estimator": "grpo", "n_samples_per_prompt": 3,
                                "per_device_training_batch_size": 2})
    torch.manual_seed(0)
    r = experience.make_rollout(m, batch, cfg, n_samples=3, group_offset=10)
    assert r.sequences.size(0) == 6 and r.values is None
    assert r.group.tolist() == [10, 10, 10, 11, 11, 11]
    assert seen["metadata"] == [{"answer": "1"}] * 3 + [{"answer": "2"}] * 3
    assert seen["prompts"][:3] == [seen["prompts"][0]] * 3 and seen["prompts"][3] != seen["prompts"][0]
    assert r.scores.tolist() == [1.0] * 3 + [2.0] * 3
    P = enc["input_ids"].size(1)
    assert all(torch.equal(r.sequences[i, :P], enc["input_ids"][i // 3]) for i in range(6))
    # Sampled, not copied: the three answers to a prompt differ (on this random model).
    assert len({tuple(row.tolist()) for row in r.responses[:3]}) > 1
    experience.shape_and_estimate(r, cfg, kl_coef=0.0, moments=None)
    assert (r.advantages == 0).all()  # each group scored alike: GRPO has nothing to learn from


def test_the_missing_eos_penalty_is_the_score_learned_from_after_normalisation_and_clip():
    r = rollout(3, 2, 4, 0, [4, 2, 4])
    r.scores, r.has_eos = torch.tensor([10.0, 10.0, -20.0]), torch.tensor([False, True, True])
    cfg = from_flat(PPOConfig, {"kl_coef": 0.0, "score_clip": 5.0, "missing_eos_penalty": -10.0})
    experience.shape_and_estimate(r, cfg, kl_coef=0.0, moments=None)
    assert r.rewards.sum(1).tolist() == [-10.0, 5.0, -5.0]  # not clipped to -5 nor normalised
    r = rollout(3, 2, 4, 0, [4, 2, 4])
    r.scores, r.has_eos = torch.tensor([10.0, 10.0, -20.0]), torch.tensor([False, True, True])
    cfg = from_flat(PPOConfig, {"kl_coef": 0.0, "normalize_scores": True, "missing_eos_penalty": -10.0})
    moments = RunningMoments()
    experience.shape_and_estimate(r, cfg, kl_coef=0.0, moments=moments)
    assert moments.count == 3 and moments.mean == pytest.approx(0.0)  # every score counts in the moments
    assert r.rewards[0].sum().item() == -10.0 and r.rewards[1].sum().item() == pytest.approx(10 / moments.std)



def test_the_length_bonus_is_added_per_answer_token_after_the_clip_and_before_the_missing_eos_penalty():
    r = rollout(3, 2, 4, 0, [4, 2, 4])
    r.scores, r.has_eos = torch.tensor([10.0, 1.0, -1.0]), torch.tensor([True, True, False])
    cfg = from_flat(PPOConfig, {"kl_coef": 0.0, "score_clip": 5.0, "length_bonus": 0.25,
                                "missing_eos_penalty": -10.0})
    experience.shape_and_estimate(r, cfg, kl_coef=0.0, moments=None)
    # 5 (clipped) + 4 x 0.25; 1 + 2 x 0.25; the EOS-less answer learns exactly the penalty
    assert r.rewards.sum(1).tolist() == [6.0, 1.5, -10.0]
    assert r.scores.tolist() == [10.0, 1.0, -1.0]  # the reward's own scores (what evaluations report) unchanged
    r = rollout(2, 2, 4, 0, [4, 1])
    r.scores = torch.tensor([1.0, 1.0])
    experience.shape_and_estimate(r, from_flat(PPOConfig, {"kl_coef": 0.0, "length_bonus": -0.5}), kl_coef=0.0,
                                  moments=None)
    assert r.rewards.sum(1).tolist() == [-1.0, 0.5]  # negative: a length penalty


def test_the_length_bonus_ended_only_skips_the_answers_cut_at_the_cap():
    r = rollout(3, 2, 4, 0, [4, 2, 4])
    r.scores, r.has_eos = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([True, True, False])
    cfg = from_flat(PPOConfig, {"kl_coef": 0.0, "length_bonus": 0.25, "length_bonus_ended_only": True})
    experience.shape_and_estimate(r, cfg, kl_coef=0.0, moments=None)
    assert r.rewards.sum(1).tolist() == [2.0, 1.5, 1.0]  # the cut answer keeps its score alone
    r.has_eos = None
    with pytest.raises(ValueError, match="--length_bonus_ended_only"):
        experience.shape_and_estimate(r, cfg, kl_coef=0.0, moments=None)

def sampled(models, cfg, n: int = 8):
    """A scored rollout of the fixture's actor (ZeRO 0), advantages filled in."""
    tok = models["tok"]
    enc = tok(["hello there", "The quick brown fox", "a b", "dog"][: n // 2] * 2, return_tensors="pt", padding=True)
    m = trainer.Models(actor=models["actor"], critic=None, ref=models["ref"],
                       reward=FunctionReward(lambda p, r: [float(len(x)) for x in r]), tokenizer=tok)
    torch.manual_seed(1)
    r = experience.make_rollout(m, enc, cfg)
    r.advantages = torch.randn(r.action_mask.shape)
    return r


def test_the_ema_moves_once_per_optimizer_step(tiny_model_dir, models):
    path = str(tiny_model_dir("llama"))
    tok = models["tok"]
    actor = build_engine(load_model(path, tok, head="causal_lm", dropout=0.0), zero_stage=0, dtype="fp32",
                         micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3)
    cfg = from_flat(PPOConfig, {"max_answer_seq_len": 4, "per_device_generation_batch_size": 8,
                                "per_device_training_batch_size": 2, "gradient_accumulation_steps": 2,
                                "ppo_epochs": 1})
    r = sampled(models, cfg)

    class Spy:
        calls = 0

        def update(self, engine):
            Spy.calls += 1

    m = trainer.Models(actor=actor, critic=None, ref=None, reward=None, tokenizer=tok, ema=Spy())
    stats = trainer.ppo_update(m, r, cfg)
    assert Spy.calls == 2  # 4 minibatches, 2 per optimizer step: the decay per step is beta, not beta^2
    assert set(stats) >= {"ppo/loss/policy", "ppo/policy/ratio"} and "ppo/loss/value" not in stats


def test_step_denominators_make_token_mean_global_over_ranks_and_micro_batches():
    """Two simulated ranks, 2 accumulated micro-batches each, ragged masks: the summed, DeepSpeed-scaled micro
    losses equal the token mean over every token of the step, whatever rank or micro-batch holds it."""
    from chatrlhf.training.step3_ppo.update import step_denominators

    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(4, 5, generator=g) > p).float() for p in (0.2, 0.7)]  # rank 1 has far fewer tokens
    losses = [torch.randn(4, 5, generator=g) for _ in masks]
    minibatches = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        counts = [torch.stack([core.aggregation_count(m[i], agg).double() for i in ([0, 1], [2, 3])]).sum().reshape(1)
                  for m in masks]
        total = sum(counts)
        total_loss = 0.0
        for mask, loss in zip(masks, losses):
            denominators = step_denominators(mask, minibatches, 2, agg, world_size=2, all_reduce_sum=lambda t: total)
            for index, d in zip(minibatches, denominators):
                # DeepSpeed: the loss divided by the accumulation steps, the gradient averaged over 2 ranks.
                total_loss += core.aggregate_loss(loss[index], mask[index], agg, d) / 2 / 2
        everything = core.aggregate_loss(torch.cat(losses), torch.cat(masks), agg)
        assert total_loss.item() == pytest.approx(everything.item(), abs=1e-6), agg


def test_evaluation_leaves_every_devices_random_generator_alone(models, monkeypatch):
    """torch.manual_seed reseeds every CUDA device too: the evaluation must save and restore them all, through
    the accelerator, not only the CPU's generator. A fake two-device accelerator stands in for CUDA here."""
    from torch.utils.data import DataLoader

    from chatrlhf.training.step3_ppo.data import PromptCollator
    from chatrlhf.utils import distributed as dist

    class FakeAccelerator:
        def __init__(self):
            self.gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]

        def device_name(self):
            return "fake"

        def device_count(self):
            return len(self.gens)

        def get_rng_state(self, device_index=None):
            return self.gens[device_index].get_state()

        def set_rng_state(self, state, device_index=None):
            self.gens[device_index].set_state(state)

        def manual_seed_all(self, seed):
            for g in self.gens:
                g.manual_seed(seed)

    fake = FakeAccelerator()
    monkeypatch.setattr(dist, "accelerator", lambda: fake)
    monkeypatch.setattr(dist, "device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", fake.manual_seed_all)  # what torch.manual_seed calls
    tok = models["tok"]
    loader = DataLoader([{"input_ids": tok("hello there")["input_ids"]}, {"input_ids": tok("a dog")["input_ids"]}],
                        batch_size=2, collate_fn=PromptCollator(tok))
    m = trainer.Models(actor=models["actor"], critic=None, ref=models["ref"],
                       reward=FunctionReward(lambda p, r: [1.0] * len(r)), tokenizer=tok)
    cfg = from_flat(PPOConfig, {"max_answer_seq_len": 3})
    torch.manual_seed(3)
    for g in fake.gens:
        g.manual_seed(4)
    before, cpu = [g.get_state() for g in fake.gens], torch.get_rng_state()
    out = trainer.evaluate(m, loader, cfg, max_batches=1)
    assert out["eval/answers"] == 2
    assert out["eval/time_generation"] > 0 and out["eval/time_scoring"] > 0  # where an evaluation's time goes
    assert all(torch.equal(g.get_state(), s) for g, s in zip(fake.gens, before))
    assert torch.equal(torch.get_rng_state(), cpu)


def test_evaluation_answers_up_to_twice_the_cap_without_the_critic_and_writes_each(models, tmp_path):
    """The held-out evaluation answers with twice the training cap by default, asks nothing of the critic, and
    writes every answer with its score, length and whether it ended, which the report pairs across evaluations."""
    import json

    from torch.utils.data import DataLoader

    from chatrlhf.training.step3_ppo.data import PromptCollator

    class NoCritic:
        def __getattr__(self, name):
            raise AssertionError(f"the evaluation used the critic ({name})")

    tok = models["tok"]
    prompts = [{"input_ids": tok(t)["input_ids"]} for t in ("hello there", "a dog", "the cat sat")]
    loader = DataLoader(prompts, batch_size=3, collate_fn=PromptCollator(tok))
    m = trainer.Models(actor=models["actor"], critic=NoCritic(), ref=models["ref"],
                       reward=FunctionReward(lambda p, r: [float(len(x)) for x in r]), tokenizer=tok)
    cfg = from_flat(PPOConfig, {"max_answer_seq_len": 4, "output_dir": str(tmp_path), "seed": 1})
    assert cfg.eval_answer_len == 8
    out = trainer.evaluate(m, loader, cfg, max_batches=1, step=5)
    rows = [json.loads(line) for line in (tmp_path / "eval_answers" / "step5-rank0.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2]
    assert max(r["length"] for r in rows) > 4 and all(1 <= r["length"] <= 8 for r in rows)
    assert all(r["eos"] == (r["length"] < 8) for r in rows)  # the tiny random model stops only at the cap or EOS
    assert [r["score"] for r in rows] == [float(len(r["answer"])) for r in rows]
    assert out["eval/eos_fraction"] == pytest.approx(sum(r["eos"] for r in rows) / 3)
    assert out["eval/response_length"] == pytest.approx(sum(r["length"] for r in rows) / 3)
    assert out["eval/kl"] == pytest.approx(sum(r["kl"] for r in rows) / 3, abs=1e-6)
    # --eval_max_answer_seq_len sets the cap itself.
    cfg = from_flat(PPOConfig, {"max_answer_seq_len": 4, "eval_max_answer_seq_len": 2, "seed": 1})
    assert trainer.evaluate(m, loader, cfg, max_batches=1)["eval/response_length"] <= 2
