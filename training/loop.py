"""The supervised training loop shared by step 1 (SFT) and step 2 (reward model).

A step supplies `loss_fn(engine, batch) -> (loss, metrics)` and `evaluate(engine) -> metrics`; this loop
does the rest the same way for both: data order, gradient accumulation, progress bar, metrics,
periodic evaluation, atomic checkpoints, and resuming from the newest one with the data position restored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from chatrlhf.training import checkpoint
from chatrlhf.training.config import TrainArgs
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import MetricsLogger, print0, progress


class SkipSampler(Sampler):
    """The first `skip` indices of `sampler` dropped: resumes an epoch where the checkpoint left it."""

    def __init__(self, sampler: Sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self):
        return max(len(self.sampler) - self.skip, 0)


def train_loader(dataset, batch_size: int, collate_fn, seed: int, epoch: int, skip_batches: int = 0) -> DataLoader:
    """This rank's shuffled shard for `epoch`, minus the batches already consumed."""
    sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=True,
                                 seed=seed)
    sampler.set_epoch(epoch)
    # Its own generator: creating the loader must not draw from the global RNG, or dropout after a resume
    # would differ from the uninterrupted run.
    return DataLoader(dataset, batch_size=batch_size, sampler=SkipSampler(sampler, skip_batches * batch_size),
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed + epoch))


def eval_loader(dataset, batch_size: int, collate_fn) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)


@dataclass
class LoopState:
    step: int = 0          # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed


def fit(engine, train_dataset, collate_fn, args: TrainArgs, *, loss_fn: Callable, evaluate: Callable,
        gradient_accumulation_steps: int, logger: MetricsLogger, desc: str, config=None) -> dict:
    """Trains `engine` on `train_dataset`; returns the last evaluation metrics. `config` (the step's resolved
    config) is saved next to each checkpoint."""
    total_steps = total_optimizer_steps(len(train_dataset), args, gradient_accumulation_steps)
    state = LoopState()
    resumed = checkpoint.latest(args.output_dir) if args.resume else None
    if resumed is not None:
        state = LoopState(**checkpoint.load(resumed, {"model": engine}))
        print0(f"resumed from {resumed} at step {state.step}")
    else:
        logger.log(0, evaluate(engine))

    bar = progress(total_steps, desc, initial=state.step)
    window: list[dict] = []
    metrics: dict = {}
    while state.step < total_steps and state.epoch < args.num_train_epochs:
        loader = train_loader(train_dataset, args.per_device_train_batch_size, collate_fn, args.seed, state.epoch,
                              skip_batches=state.batch_in_epoch)
        for batch in loader:
            engine.train()
            boundary = engine.is_boundary()  # DeepSpeed answers for the micro-step about to run
            loss, metrics = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            state.batch_in_epoch += 1
            window.append({"train/loss": loss.detach().float(), **metrics})
            if args.print_loss:
                print(f"[rank {dist.get_rank()}] step {state.step} loss {loss.item():.4f}", flush=True)
            if not boundary:
                continue
            state.step += 1
            bar.update(1)
            if state.step % args.log_interval == 0 or state.step == total_steps:
                averaged = _average(window)
                averaged["train/lr"] = engine.lr()
                logger.log(state.step, averaged)
                bar.set_postfix(loss=f"{averaged['train/loss']:.4f}")
            window = []
            if args.eval_interval and state.step % args.eval_interval == 0 and state.step < total_steps:
                logger.log(state.step, evaluate(engine))
            if args.save_interval and state.step % args.save_interval == 0 and state.step < total_steps:
                checkpoint.save(args.output_dir, state.step, {"model": engine}, vars(state), keep=args.save_total_limit,
                                config=config)
            if state.step >= total_steps:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        break
    bar.close()
    final = evaluate(engine)
    logger.log(state.step, final)
    return final


def total_optimizer_steps(n_examples: int, args: TrainArgs, gradient_accumulation_steps: int) -> int:
    batches = math.ceil(n_examples / (args.per_device_train_batch_size * dist.get_world_size()))
    steps = max(batches * args.num_train_epochs // gradient_accumulation_steps, 1)
    return min(steps, args.max_steps) if args.max_steps > 0 else steps


def _average(window: list[dict]) -> dict:
    """Mean over the accumulated micro-batches, then over ranks."""
    keys = window[0].keys()
    local = torch.tensor([float(sum(float(w[k]) for w in window) / len(window)) for k in keys], dtype=torch.float64)
    return dict(zip(keys, dist.all_reduce_mean(local.to(dist.device())).tolist()))
