"""Step 2: the reward-model loss, its evaluation, and the training run (the loop skeleton is
`chatrlhf.training.loop.fit`)."""
from __future__ import annotations

import math

import torch

from chatrlhf.training.loop import eval_loader, fit_supervised
from chatrlhf.training.step2_reward.loss import pairwise_accuracy, pairwise_loss, pairwise_losses
from chatrlhf.training.value_model import end_scores, token_values
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import print0


def pair_scores(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A PairCollator batch (input_ids, attention_mask [2B, T]; rows i and B + i are a pair) ->
    (chosen scores (B,), rejected scores (B,)), each read at the sequence's last real token (its EOS)."""
    input_ids = batch["input_ids"].to(engine.device)
    attention_mask = batch["attention_mask"].to(engine.device)
    scores = end_scores(token_values(engine, input_ids, attention_mask), attention_mask)
    half = scores.size(0) // 2
    return scores[:half], scores[half:]


def reward_loss(engine, batch: dict, margin: float = 0.0, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean pairwise loss over this rank's pairs. Every rank holds the same number of pairs, so DeepSpeed's
    gradient average over ranks is the global mean: two ranks of B pairs train exactly like one of 2B."""
    chosen, rejected = pair_scores(engine, batch)
    loss = pairwise_loss(chosen, rejected, margin, center_coef)
    with torch.no_grad():
        metrics = {"train/accuracy": pairwise_accuracy(chosen, rejected),
                   "train/margin": (chosen.float() - rejected.float()).mean()}
    return loss, metrics


@torch.no_grad()
def evaluate(engine, dataset, collate_fn, batch_size: int, max_batches: int, margin: float = 0.0,
             center_coef: float = 0.0) -> dict:
    """Pairwise accuracy, mean chosen and rejected scores, mean margin (chosen - rejected) and loss over (at most
    `max_batches` batches per rank of) the eval split, summed across ranks."""
    engine.eval()
    # n pairs, correct, sum chosen, sum rejected, sum loss
    total = torch.zeros(5, dtype=torch.float64, device=engine.device)
    for i, batch in enumerate(eval_loader(dataset, batch_size, collate_fn)):
        if i >= max_batches:
            break
        chosen, rejected = pair_scores(engine, batch)
        chosen, rejected = chosen.double(), rejected.double()
        total += torch.stack([torch.tensor(float(chosen.numel()), dtype=torch.float64, device=total.device),
                              (chosen > rejected).double().sum(), chosen.sum(), rejected.sum(),
                              pairwise_losses(chosen, rejected, margin, center_coef).double().sum()])
    engine.train()
    n, correct, chosen_sum, rejected_sum, loss_sum = dist.all_reduce_sum(total).tolist()
    if n == 0:
        print0("step 2: the eval split is empty; no evaluation metrics (raise --eval_fraction)")
        return {}
    return {"eval/accuracy": correct / n, "eval/chosen_score": chosen_sum / n, "eval/rejected_score": rejected_sum / n,
            "eval/margin": (chosen_sum - rejected_sum) / n, "eval/loss": loss_sum / n, "eval/pairs": int(n)}


def train(engine, data, collate_fn, cfg, logger, total_steps: int) -> dict:
    """Trains `engine` for `total_steps` optimizer steps; returns the final evaluation metrics."""
    margin, center, run = cfg.margin, cfg.center_coef, cfg.train
    return fit_supervised(
        engine, data.train, collate_fn, run, total_steps=total_steps,
        loss_fn=lambda e, b: reward_loss(e, b, margin, center),
        evaluate=lambda: evaluate(engine, data.eval, collate_fn, run.per_device_eval_batch_size, run.eval_iters,
                                  margin, center),
        logger=logger, desc="step 2 reward model", config=cfg,
        chance_loss=math.log1p(math.exp(margin)))  # every pair tied: -logsigmoid(-margin)
