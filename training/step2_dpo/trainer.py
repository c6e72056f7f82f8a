"""DPO's loss step, its evaluation, the reference (a frozen model, the policy with its LoRA adapters off,
precomputed log-probabilities, or none), and the training run (the loop skeleton is
`chatrlhf.training.loop.fit_supervised`)."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler

from chatrlhf.training import packing
from chatrlhf.training.loop import eval_loader, fit_supervised
from chatrlhf.training.step2_dpo.data import WithRefLogprobs
from chatrlhf.training.step2_dpo.loss import (LENGTH_NORMALISED, preference_losses, sequence_logprobs, token_kl,
                                              token_logprobs, wins)
from chatrlhf.training.value_model import accepts_position_ids, position_ids, unwrap
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import print0, progress

REFERENCE_KINDS = ("model", "adapters", "precomputed", "none")


@dataclass
class Reference:
    """Where the reference log-probabilities come from: a frozen `engine` ("model"), the policy with its LoRA
    adapters disabled ("adapters": no second copy), the batch's `ref_logprobs` ("precomputed"), or nowhere
    ("none": reference-free losses)."""
    kind: str
    engine: object = None

    def __post_init__(self):
        if self.kind not in REFERENCE_KINDS:
            raise ValueError(f"reference kind must be one of {REFERENCE_KINDS}, got {self.kind!r}")
        if (self.kind == "model") != (self.engine is not None):
            raise ValueError("a 'model' reference needs its engine, and only it has one")

    @property
    def live(self) -> bool:
        """A model is at hand to evaluate (KL needs its whole next-token distributions)."""
        return self.kind in ("model", "adapters")


def reference_kind(cfg) -> str:
    """The reference a DPOConfig trains against. With LoRA on a frozen base the adapters-off policy IS the starting
    model; with LoRA whose base trains too it is that only before the first step, so its log-probabilities are
    precomputed then."""
    if not cfg.uses_reference():
        return "none"
    lora = cfg.model.lora_dim > 0
    if cfg.precompute_ref_logprobs or (lora and not cfg.engine.only_optimize_lora):
        return "precomputed"
    return "adapters" if lora else "model"


def logits(engine, batch: dict) -> torch.Tensor:
    """A DPOCollator batch through a causal LM (bare, peft-wrapped or an engine) -> logits (2B, T, V). Position ids
    count real tokens only, so left and right padding give the same log-probabilities. Padding-free where it
    applies (`chatrlhf.training.packing`): padding positions then get zero logits (the answer mask drops them)."""
    device = engine.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hf = unwrap(engine)
    packed = packing.maybe_pack(hf, ids, mask)
    out = None if packed is None else packing.call(engine, hf, packed)
    if out is not None:
        return packed.unpack(out.logits)
    kwargs = {"position_ids": position_ids(mask)} if accepts_position_ids(hf) else {}
    return engine(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits


@contextmanager
def adapters_off(policy):
    """The policy as its own reference: LoRA adapters bypassed, eval mode (no dropout), no grad; restored after."""
    module = policy.module
    was_training = module.training
    policy.engine.eval()
    try:
        with module.disable_adapter(), torch.no_grad():
            yield
    finally:
        policy.engine.train(was_training)


def reference_logits(ref: Reference, policy, batch: dict) -> torch.Tensor:
    """(2B, T, V) logits of a live reference, without grad."""
    if ref.kind == "model":
        with torch.no_grad():
            return logits(ref.engine, batch)
    if ref.kind == "adapters":
        with adapters_off(policy):
            return logits(policy, batch)
    raise ValueError(f"a {ref.kind!r} reference has no logits")


def reference_logprobs(ref: Reference, policy, batch: dict) -> torch.Tensor | None:
    """(2B,) summed answer log-probabilities of the reference (None when reference-free)."""
    if ref.kind == "none":
        return None
    if ref.kind == "precomputed":
        if "ref_logprobs" not in batch:
            raise KeyError("a precomputed reference needs pairs carrying ref_logprobs (WithRefLogprobs)")
        return batch["ref_logprobs"].to(policy.device)
    ids, action = batch["input_ids"].to(policy.device), batch["action_mask"].to(policy.device)
    return sequence_logprobs(token_logprobs(reference_logits(ref, policy, batch), ids), action)


def _halves(t: torch.Tensor | None):
    if t is None:
        return None, None
    half = t.size(0) // 2
    return t[:half], t[half:]


def dpo_loss(engine, batch: dict, ref: Reference, cfg) -> tuple[torch.Tensor, dict]:
    """Mean preference loss over this rank's pairs. Every rank holds the same number of pairs, so DeepSpeed's
    gradient average over ranks is the global mean: two ranks of B pairs train exactly like one of 2B."""
    ref_lp = reference_logprobs(ref, engine, batch)  # first: its activations are gone before the policy's graph
    ids, action = batch["input_ids"].to(engine.device), batch["action_mask"].to(engine.device)
    token_lp = token_logprobs(logits(engine, batch), ids)
    summed = sequence_logprobs(token_lp, action)
    policy_lp = sequence_logprobs(token_lp, action, average=True) if cfg.loss_type in LENGTH_NORMALISED else summed
    (pc, pr), (rc, rr) = _halves(policy_lp), _halves(ref_lp)
    losses, chosen_rewards, rejected_rewards = preference_losses(
        cfg.loss_type, pc, pr, rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma)
    with torch.no_grad():
        sc, sr = _halves(summed.detach())
        metrics = {"train/accuracy": wins(chosen_rewards, rejected_rewards).mean(),
                   "train/margin": (chosen_rewards - rejected_rewards).mean(),
                   "train/chosen_reward": chosen_rewards.mean(), "train/rejected_reward": rejected_rewards.mean(),
                   "train/chosen_logprob": sc.mean(), "train/rejected_logprob": sr.mean()}
    return losses.mean(), metrics


EVAL_SUMS = ("pairs", "wins", "chosen_reward", "rejected_reward", "loss", "chosen_logprob", "rejected_logprob",
             "logprob_wins", "shorter_wins", "kl_chosen", "chosen_tokens")


@torch.no_grad()
def evaluate(engine, ref: Reference, dataset, collate_fn, batch_size: int, max_batches: int, cfg) -> dict:
    """Over (at most `max_batches` batches per rank of) the eval split, summed across ranks:
    accuracy (the implicit reward of the chosen answer beats the rejected one's; ties count half), mean chosen
    and rejected rewards and their margin, loss, mean summed log-probabilities of the chosen and rejected answers
    (both falling is DPO's known failure), logprob_accuracy (the policy's own log-probability prefers the chosen
    answer), shorter_wins (the baseline "the shorter answer is the chosen one" on the same pairs) and, with a
    live reference, kl_chosen: KL(policy || reference) summed over the chosen answers' tokens (nats per answer)."""
    engine.eval()
    total = torch.zeros(len(EVAL_SUMS), dtype=torch.float64, device=engine.device)
    for i, batch in enumerate(eval_loader(dataset, batch_size, collate_fn)):
        if i >= max_batches:
            break
        ids, action = batch["input_ids"].to(engine.device), batch["action_mask"].to(engine.device)
        policy_logits = logits(engine, batch)
        token_lp = token_logprobs(policy_logits, ids)
        summed = sequence_logprobs(token_lp, action)
        policy_lp = sequence_logprobs(token_lp, action, average=True) if cfg.loss_type in LENGTH_NORMALISED else summed
        half = ids.size(0) // 2
        kl = torch.zeros(half, device=engine.device)
        if ref.live:
            ref_logits = reference_logits(ref, engine, batch)
            ref_lp = sequence_logprobs(token_logprobs(ref_logits, ids), action)
            kl = token_kl(policy_logits[:half], ref_logits[:half], action[:half])
            del ref_logits
        else:
            ref_lp = reference_logprobs(ref, engine, batch)
        (pc, pr), (rc, rr), (sc, sr) = _halves(policy_lp), _halves(ref_lp), _halves(summed)
        losses, cw, rw = preference_losses(cfg.loss_type, pc, pr, rc, rr, beta=cfg.beta,
                                           label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma)
        length_c, length_r = _halves(action.sum(-1).float())
        parts = [torch.tensor(float(half), device=engine.device), wins(cw, rw).sum(), cw.sum(), rw.sum(), losses.sum(),
                 sc.sum(), sr.sum(), wins(sc, sr).sum(), wins(-length_c, -length_r).sum(), kl.sum(), length_c.sum()]
        total += torch.stack([p.double() for p in parts])
    engine.train()
    sums = dict(zip(EVAL_SUMS, dist.all_reduce_sum(total).tolist()))
    n = sums["pairs"]
    if n == 0:
        print0("step 2 DPO: the eval split is empty; no evaluation metrics (raise --eval_fraction)")
        return {}
    out = {"eval/accuracy": sums["wins"] / n, "eval/chosen_reward": sums["chosen_reward"] / n,
           "eval/rejected_reward": sums["rejected_reward"] / n,
           "eval/margin": (sums["chosen_reward"] - sums["rejected_reward"]) / n, "eval/loss": sums["loss"] / n,
           "eval/chosen_logprob": sums["chosen_logprob"] / n, "eval/rejected_logprob": sums["rejected_logprob"] / n,
           "eval/logprob_accuracy": sums["logprob_wins"] / n, "eval/shorter_wins": sums["shorter_wins"] / n,
           "eval/chosen_tokens": sums["chosen_tokens"] / n, "eval/pairs": int(n)}
    if ref.live:
        out["eval/kl_chosen"] = sums["kl_chosen"] / n
    return out


@torch.no_grad()
def precompute_ref_logprobs(ref: Reference, policy, dataset, collate_fn, batch_size: int,
                            desc: str = "reference") -> torch.Tensor:
    """(N, 2) fp32 (chosen, rejected) summed answer log-probabilities of a live reference for every pair of
    `dataset`, each rank scoring its shard, then shared with every rank."""
    n = len(dataset)
    sums = torch.zeros(n, 2, dtype=torch.float64, device=policy.device)
    counts = torch.zeros(n, dtype=torch.float64, device=policy.device)
    # Equal shards (DistributedSampler pads with repeats): under ZeRO-3 every rank must run as many forwards.
    order = list(DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                    shuffle=False)) if n else []
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = progress(len(chunks), f"step 2 DPO: {desc} log-probs")
    for chunk in chunks:
        batch = collate_fn([dataset[i] for i in chunk])
        chosen, rejected = _halves(reference_logprobs(ref, policy, batch))
        index = torch.as_tensor(chunk, device=policy.device)
        sums.index_add_(0, index, torch.stack([chosen, rejected], dim=1).double())
        counts.index_add_(0, index, torch.ones(len(chunk), dtype=torch.float64, device=policy.device))
        bar.update(1)
    bar.close()
    sums, counts = dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)
    return (sums / counts.clamp(min=1.0).unsqueeze(-1)).float().cpu()


def with_ref_logprobs(data, ref: Reference, policy, collate_fn, batch_size: int):
    """`data` (PhaseData) whose train and eval pairs carry the reference's log-probabilities (WithRefLogprobs)."""
    splits = {name: WithRefLogprobs(ds, precompute_ref_logprobs(ref, policy, ds, collate_fn, batch_size, name))
              for name, ds in (("train", data.train), ("eval", data.eval))}
    return dataclasses.replace(data, **splits)


def train(engine, ref: Reference, data, collate_fn, cfg, logger, total_steps: int) -> dict:
    """Trains `engine` for `total_steps` optimizer steps; returns the final evaluation metrics."""
    run = cfg.train
    return fit_supervised(
        engine, data.train, collate_fn, run, total_steps=total_steps,
        loss_fn=lambda e, b: dpo_loss(e, b, ref, cfg),
        evaluate=lambda: evaluate(engine, ref, data.eval, collate_fn, run.per_device_eval_batch_size, run.eval_iters,
                                  cfg),
        logger=logger, desc=f"step 2 DPO ({cfg.loss_type})", config=cfg, chance_loss=chance_loss(cfg))


def chance_loss(cfg) -> float:
    """The loss of a policy that has learned nothing: chosen and rejected equally likely relative to the
    reference (h = 0), which is also every sigmoid-family loss at step 0."""
    zero = torch.zeros(1)
    return preference_losses(cfg.loss_type, zero, zero, zero, zero, beta=cfg.beta,
                             label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma)[0].item()
