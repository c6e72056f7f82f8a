"""The loop skeleton every step shares (`fit`), the batch stream that feeds it, and the run state it saves.

A step's trainer.py supplies `train_step() -> metrics` (steps 1-2: one optimizer step over accumulated
micro-batches, `supervised_step`; step 3: a rollout and its PPO update) and `evaluate() -> metrics`; `fit` does
the rest the same way for all: resume or the initial evaluation, progress bar, metrics, evaluation and atomic
checkpoints every N steps, the final evaluation. Batches come from `batch_stream`, which spans epochs and keeps
its position in the run state, so a resumed run continues with the batch the killed one would have taken.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from chatrlhf.training import checkpoint
from chatrlhf.training.config import RunArgs, TrainArgs
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
class RunState:
    """Where a run is; saved in every checkpoint (trainer_state.json) and restored on resume."""
    step: int = 0            # steps done: optimizer steps (steps 1-2), PPO iterations (step 3)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    extra: dict = field(default_factory=dict)  # a trainer's own resumable values (step 3: kl_coef, ...)


def batch_stream(dataset, batch_size: int, collate_fn, seed: int, state: RunState, num_epochs: int,
                 group: int | None = None) -> Iterator:
    """This rank's batches from `state`'s position on, epoch after epoch, counted into `state` as they are taken
    (so a checkpoint taken between two steps resumes with the next unseen batch). With `group=k` it yields lists
    of k batches and drops an epoch's incomplete last group (step 3 collects k generation batches per update)."""
    size = group or 1
    while state.epoch < num_epochs:
        loader = iter(train_loader(dataset, batch_size, collate_fn, seed, state.epoch, state.batch_in_epoch))
        while len(batches := list(itertools.islice(loader, size))) == size:
            state.batch_in_epoch += size
            yield batches if group else batches[0]
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def fit(*, state: RunState, total_steps: int, run: RunArgs, engines: dict, train_step: Callable[[], dict | None],
        evaluate: Callable[[], dict], logger: MetricsLogger, desc: str, config=None,
        summarize: Callable[[dict], dict] | None = None, postfix: Callable[[dict], dict] | None = None,
        on_resume: Callable[[Path], None] | None = None, on_save: Callable[[Path], None] | None = None) -> dict:
    """The loop every step shares; returns the final evaluation's metrics.

    Resumes `engines` and `state` from the newest checkpoint in run.output_dir (else evaluates first), then
    calls `train_step()` (None: the data ran out) until `total_steps`, logging every --log_interval steps
    (`summarize` turns a step's metrics into the logged ones, e.g. a mean over ranks), evaluating every
    --eval_interval and checkpointing every --save_interval steps; evaluates at the end. `config` (the step's
    resolved config) is saved next to each checkpoint; `on_resume`/`on_save` get the checkpoint folder."""
    resumed = checkpoint.latest(run.output_dir) if run.resume else None
    if resumed is not None:
        saved = checkpoint.load(resumed, engines)
        state.step, state.epoch, state.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        state.extra = saved.get("extra", {})
        if on_resume is not None:
            on_resume(resumed)
        print0(f"resumed from {resumed} at step {state.step}")
    else:
        logger.log(0, evaluate())

    bar = progress(total_steps, desc, initial=state.step)
    while state.step < total_steps:
        metrics = train_step()
        if metrics is None:
            break
        state.step += 1
        bar.update(1)
        if state.step % run.log_interval == 0 or state.step == total_steps:
            metrics = summarize(metrics) if summarize is not None else metrics
            logger.log(state.step, metrics)
            if postfix is not None:
                bar.set_postfix(**postfix(metrics))
        if state.step == total_steps:
            break
        if run.eval_interval and state.step % run.eval_interval == 0:
            logger.log(state.step, evaluate())
        if run.save_interval and state.step % run.save_interval == 0:
            path = checkpoint.save(run.output_dir, state.step, engines, asdict(state), keep=run.save_total_limit,
                                   config=config)
            if on_save is not None:
                on_save(path)
    bar.close()
    final = evaluate()
    logger.log(state.step, final)
    return final


def total_optimizer_steps(n_examples: int, args: TrainArgs, gradient_accumulation_steps: int) -> int:
    batches = math.ceil(n_examples / (args.per_device_train_batch_size * dist.get_world_size()))
    steps = max(batches * args.num_train_epochs // gradient_accumulation_steps, 1)
    return min(steps, args.max_steps) if args.max_steps > 0 else steps


def supervised_step(engine, batches: Iterator, loss_fn: Callable, print_loss: bool = False) -> list[dict] | None:
    """One optimizer step of steps 1-2: micro-batches from `batches` through forward, backward and DeepSpeed's
    step until its accumulation boundary. Returns each micro-batch's metrics (None when `batches` ran out)."""
    window = []
    for batch in batches:
        engine.train()
        boundary = engine.is_boundary()  # DeepSpeed answers for the micro-step about to run
        loss, metrics = loss_fn(engine, batch)
        engine.backward(loss)
        engine.step()
        window.append({"train/loss": loss.detach().float(), **metrics})
        if print_loss:
            print(f"[rank {dist.get_rank()}] loss {loss.item():.4f}", flush=True)
        if boundary:
            return window
    return None


def fit_supervised(engine, train_dataset, collate_fn, run: TrainArgs, *, total_steps: int, loss_fn: Callable,
                   evaluate: Callable[[], dict], logger: MetricsLogger, desc: str, config=None) -> dict:
    """`fit` for steps that learn from a fixed dataset (SFT, reward model, DPO): each step is one optimizer step
    over --gradient_accumulation_steps micro-batches of `loss_fn(engine, batch) -> (loss, metrics)`."""
    state = RunState()
    batches = batch_stream(train_dataset, run.per_device_train_batch_size, collate_fn, run.seed, state,
                           run.num_train_epochs)
    return fit(state=state, total_steps=total_steps, run=run, engines={"model": engine},
               train_step=lambda: supervised_step(engine, batches, loss_fn, run.print_loss), evaluate=evaluate,
               logger=logger, desc=desc, config=config,
               summarize=lambda window: {**mean_over_ranks(window), "train/lr": engine.lr()},
               postfix=lambda m: {"loss": f"{m['train/loss']:.4f}"})


def mean_over_ranks(window: list[dict]) -> dict:
    """Mean over the accumulated micro-batches, then over ranks."""
    keys = window[0].keys()
    local = torch.tensor([float(sum(float(w[k]) for w in window) / len(window)) for k in keys], dtype=torch.float64)
    return dict(zip(keys, dist.all_reduce_mean(local.to(dist.device())).tolist()))
