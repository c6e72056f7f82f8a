"""Step 1: the SFT loss, its evaluation, and the training run (the loop skeleton is `chatrlhf.training.loop.fit`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chatrlhf.training import packing
from chatrlhf.training.loop import eval_loader, fit_supervised
from chatrlhf.training.value_model import unwrap
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import print0


def token_losses(engine, batch: dict, fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens of `batch`, and their count."""
    input_ids, attention_mask = batch["input_ids"].to(engine.device), batch["attention_mask"].to(engine.device)
    labels = batch["labels"].to(engine.device)[:, 1:]
    # Padding-free where it applies, the head on the labelled positions only (position t predicts token t + 1).
    packed = packing.logits_at(engine, unwrap(engine), input_ids, attention_mask, F.pad(labels != -100, (0, 1)))
    if packed is not None:  # (K, V)
        logits, labels = packed, labels[labels != -100]
    else:
        logits = engine(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    if fp32:
        logits = logits.float()
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")
    return loss_sum, (labels != -100).sum()


def sft_loss(engine, batch: dict, fp32: bool = False) -> tuple[torch.Tensor, dict]:
    """Token-mean cross-entropy over the whole global micro-batch.

    Each rank divides its sum by the mean token count per rank (not its own count), so after DeepSpeed
    averages gradients over ranks the result is the global token mean: two ranks train exactly like one.
    """
    loss_sum, n_tokens = token_losses(engine, batch, fp32)
    mean_tokens = dist.all_reduce_mean(n_tokens.float()).clamp(min=1.0)
    return loss_sum / mean_tokens, {"train/tokens": n_tokens.float()}


@torch.no_grad()
def evaluate(engine, dataset, collate_fn, batch_size: int, max_batches: int, fp32: bool = False) -> dict:
    """Perplexity and loss over (at most `max_batches` batches of) the eval split, across ranks."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for i, batch in enumerate(eval_loader(dataset, batch_size, collate_fn)):
        if i >= max_batches:
            break
        loss_sum, n = token_losses(engine, batch, fp32)
        total += torch.stack([loss_sum.double(), n.double()])
    engine.train()
    total = dist.all_reduce_sum(total)
    if total[1].item() == 0:  # not a perplexity of 1.0: there was nothing to measure
        print0("step 1: the eval split is empty; no evaluation metrics (raise --eval_fraction)")
        return {}
    loss = (total[0] / total[1]).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def train(engine, data, collate_fn, cfg, logger, total_steps: int) -> dict:
    """Trains `engine` for `total_steps` optimizer steps; returns the final evaluation metrics."""
    fp32, run = cfg.engine.compute_fp32_loss, cfg.train
    return fit_supervised(
        engine, data.train, collate_fn, run, total_steps=total_steps, loss_fn=lambda e, b: sft_loss(e, b, fp32),
        evaluate=lambda: evaluate(engine, data.eval, collate_fn, run.per_device_eval_batch_size, run.eval_iters, fp32),
        logger=logger, desc="step 1 SFT", config=cfg, chance_loss=_uniform_loss(engine))


def _uniform_loss(engine) -> float | None:
    """ln(vocabulary size): the loss of a model that predicts every token as equally likely."""
    vocab = getattr(getattr(engine.module, "config", None), "vocab_size", None)
    return math.log(vocab) if isinstance(vocab, int) and vocab > 1 else None
