"""Step 2: the reward-model loss, its evaluation, and the training run (the loop skeleton is
`chatrlhf.training.loop.fit`)."""
from __future__ import annotations

import math

import torch

from chatrlhf.training.loop import eval_loader, fit_supervised
from chatrlhf.training.step2_reward.loss import (fit_length_slope, length_margins, pairwise_accuracy, pairwise_loss,
                                                 pairwise_losses)
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


def reward_loss(engine, batch: dict, margin: float = 0.0, center_coef: float = 0.0,
                length_slope: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean pairwise loss over this rank's pairs. Every rank holds the same number of pairs, so DeepSpeed's
    gradient average over ranks is the global mean: two ranks of B pairs train exactly like one of 2B.
    `length_slope` (--length_debias's fit): each pair's margin also holds length_margins of its answer lengths."""
    chosen, rejected = pair_scores(engine, batch)
    if length_slope:
        lc, lr = batch["answer_lengths"].to(chosen.device).chunk(2)
        margin = margin + length_margins(length_slope, lc, lr)
    loss = pairwise_loss(chosen, rejected, margin, center_coef)
    with torch.no_grad():
        metrics = {"train/accuracy": pairwise_accuracy(chosen, rejected),
                   "train/margin": (chosen.float() - rejected.float()).mean()}
    return loss, metrics


# Pairs whose answers differ in length by less than this share of the longer one: where length cannot decide.
LENGTH_CONTROLLED = 0.2


@torch.no_grad()
def evaluate(engine, dataset, collate_fn, batch_size: int, max_batches: int, margin: float = 0.0,
             center_coef: float = 0.0, prefix: str = "eval") -> dict:
    """Pairwise accuracy, mean chosen and rejected scores, mean margin (chosen - rejected) and loss over (at most
    `max_batches` batches per rank of) the eval split, summed across ranks. Next to the accuracy, what length alone
    scores on the same pairs ("the shorter answer wins", ties half) and the accuracy on the pairs whose answers are
    within 20% of each other's length: a reward model that only learned length is at chance there. The two
    accuracies come with their standard errors (`_se`); keys are `prefix`/name."""
    engine.eval()
    # n pairs, correct, sum chosen, sum rejected, sum loss, shorter wins, length-controlled pairs and correct
    total = torch.zeros(8, dtype=torch.float64, device=engine.device)
    for i, batch in enumerate(eval_loader(dataset, batch_size, collate_fn)):
        if i >= max_batches:
            break
        chosen, rejected = pair_scores(engine, batch)
        chosen, rejected = chosen.double(), rejected.double()
        correct = (chosen > rejected).double()
        lengths = batch.get("answer_lengths")
        if lengths is None:  # pairs without prompt_length: no length baselines (-1 marks them absent)
            length_sums = [torch.tensor(-1.0, dtype=torch.float64)] * 3
        else:
            lc, lr = lengths.to(total.device).double().chunk(2)
            close = ((lc - lr).abs() < LENGTH_CONTROLLED * torch.maximum(lc, lr)).double()
            length_sums = [((lc < lr).double() + 0.5 * (lc == lr).double()).sum(), close.sum(), (close * correct).sum()]
        total += torch.stack([torch.tensor(float(chosen.numel()), dtype=torch.float64, device=total.device),
                              correct.sum(), chosen.sum(), rejected.sum(),
                              pairwise_losses(chosen, rejected, margin, center_coef).double().sum(),
                              *[x.to(total.device) for x in length_sums]])
    engine.train()
    n, correct, chosen_sum, rejected_sum, loss_sum, shorter, n_close, correct_close = \
        dist.all_reduce_sum(total).tolist()
    if n == 0:
        print0("step 2: the eval split is empty; no evaluation metrics (raise --eval_fraction)")
        return {}
    out = {"accuracy": correct / n, "accuracy_se": _binary_se(correct, n), "chosen_score": chosen_sum / n,
           "rejected_score": rejected_sum / n, "margin": (chosen_sum - rejected_sum) / n, "loss": loss_sum / n,
           "pairs": int(n)}
    if shorter >= 0:
        out.update({"shorter_wins": shorter / n, "length_controlled_pairs": int(n_close)})
        if n_close:  # (no key rather than a NaN, which the run's guards would read as divergence)
            out["accuracy_length_controlled"] = correct_close / n_close
            out["accuracy_length_controlled_se"] = _binary_se(correct_close, n_close)
    return {f"{prefix}/{k}": v for k, v in out.items()}


def _binary_se(hits: float, n: float) -> float:
    """Standard error of a share of hits among n 0/1 outcomes (utils.stats.mean_se's: sample std / sqrt(n));
    0 for a single outcome rather than a NaN."""
    p = hits / n
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def evaluate_unseen(engine, parts: list, collate_fn, cfg) -> dict:
    """`evaluate` (keys heldout/*) over every pair of `parts` ([(name, Dataset)], data.unseen_pairs) as one set:
    a figure on several times the eval split's pairs, so a standard error several times smaller."""
    from datasets import concatenate_datasets

    nonempty = [d for _, d in parts if len(d)]
    if not nonempty:
        return {}
    return evaluate(engine, concatenate_datasets(nonempty), collate_fn, cfg.train.per_device_eval_batch_size,
                    math.inf, cfg.margin, cfg.center_coef, prefix="heldout")


def training_length_slope(dataset) -> float:
    """--length_debias's slope, `fit_length_slope` over every training pair (the same on every rank: each loads
    the whole split). Needs the prompt_length column (REWARD_DATA's tokenisation)."""
    if "prompt_length" not in dataset.column_names:
        raise ValueError("--length_debias needs the pairs' prompt_length column (step 2's tokenisation)")
    diff = [len(r) - len(c) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])]
    return fit_length_slope(torch.tensor(diff, dtype=torch.float64))


def train(engine, data, collate_fn, cfg, logger, total_steps: int) -> dict:
    """Trains `engine` for `total_steps` optimizer steps; returns the final evaluation metrics."""
    margin, center, run = cfg.margin, cfg.center_coef, cfg.train
    slope = 0.0
    if cfg.length_debias:
        slope = training_length_slope(data.train)
        print0(f"step 2: --length_debias: length alone fits P(chosen) = sigmoid({slope:.5f} x (rejected - chosen "
               f"answer tokens)) on the {len(data.train)} training pairs; that is each pair's margin")
    return fit_supervised(
        engine, data.train, collate_fn, run, total_steps=total_steps,
        loss_fn=lambda e, b: reward_loss(e, b, margin, center, slope),
        evaluate=lambda: evaluate(engine, data.eval, collate_fn, run.per_device_eval_batch_size, run.eval_iters,
                                  margin, center),
        logger=logger, desc="step 2 reward model", config=cfg,
        chance_loss=math.log1p(math.exp(margin)))  # every pair tied: -logsigmoid(-margin)
