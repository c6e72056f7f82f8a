"""The loop skeleton every step shares (`fit`), the batch stream that feeds it, and the run state it saves.

A step's trainer.py supplies `train_step() -> metrics` (steps 1-2: one optimizer step over accumulated
micro-batches, `supervised_step`; step 3: a rollout and its PPO update) and `evaluate() -> metrics`; `fit` does
the rest the same way for all: resume or the initial evaluation, progress bar, metrics, evaluation and atomic
checkpoints every N steps, the final evaluation. Batches come from `batch_stream`, which spans epochs and keeps
its position in the run state, so a resumed run continues with the batch the killed one would have taken.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from chatrlhf.training import checkpoint, guards, memory_plan, resume
from chatrlhf.training.config import RunArgs, TrainArgs
from chatrlhf.utils import distributed as dist
from chatrlhf.utils import watchdog
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
        on_resume: Callable[[Path], None] | None = None, on_save: Callable[[Path], None] | None = None,
        chance_loss: float | None = None) -> dict:
    """The loop every step shares; returns the final evaluation's metrics.

    Resumes `engines` and `state` from the newest checkpoint in run.output_dir (else evaluates first, unless
    --eval_before_training false), then calls `train_step()` (None: the data ran out) until `total_steps`, logging
    every --log_interval steps (`summarize` turns a step's metrics into the logged ones, e.g. a mean over ranks),
    evaluating every --eval_interval and checkpointing every --save_interval steps; evaluates at the end.
    `config` (the step's resolved config) is saved next to each checkpoint, and a resume is refused when it
    differs in a meaningful flag (chatrlhf.training.resume); `on_resume`/`on_save` get the checkpoint folder.

    Guards (chatrlhf.training.guards): every step's metrics (summarised over ranks: the same on every rank) and
    every evaluation must be finite, and the weights before each checkpoint and at the end; otherwise
    NonFiniteError stops the run with nothing saved from that state. `chance_loss` (the loss of a model that has
    learned nothing) turns a run stuck there into a warning. A watchdog (--hang_timeout) turns a stall into an
    error that names the rank that stopped (chatrlhf.utils.watchdog)."""
    out = Path(run.output_dir)
    run_id = dist.broadcast_object(f"{time.time_ns()}-{os.getpid()}")  # tells this run's heartbeats from old ones
    watchdog.start(out, run.hang_timeout, dist.get_rank(), dist.get_world_size(), run_id)
    try:
        return _fit(state, total_steps, run, engines, train_step, evaluate, logger, desc, config, summarize,
                    postfix, on_resume, on_save, chance_loss)
    finally:
        watchdog.stop()


def _fit(state, total_steps, run, engines, train_step, evaluate, logger, desc, config, summarize, postfix,
         on_resume, on_save, chance_loss) -> dict:
    out = Path(run.output_dir)
    lrs = lambda: guards.learning_rates(engines)  # noqa: E731

    def evaluated(step: int, when: str) -> dict:
        watchdog.progress(step, "evaluate")
        metrics = evaluate()
        logger.log(step, metrics)
        guards.check_metrics(metrics, step=step, lrs=lrs(), output_dir=out, when=when)
        return metrics

    resumed = checkpoint.latest(run.output_dir) if run.resume else None
    if resumed is not None:
        if config is not None:
            resume.check(config, resumed, allow_changes=run.resume_with_changes)
        watchdog.progress(phase="resume")
        saved = checkpoint.load(resumed, engines)
        state.step, state.epoch, state.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        state.extra = saved.get("extra", {})
        if on_resume is not None:
            on_resume(resumed)
        print0(f"resumed from {resumed} at step {state.step}")
        guards.check_weights(engines, step=state.step, lrs=lrs(), output_dir=out,
                             when=f"resuming {resumed}")
    else:
        guards.check_weights(engines, step=0, lrs=lrs(), output_dir=out, when="before training",
                             hint=guards.BROKEN_MODEL_HINT)
        if run.eval_before_training:
            evaluated(0, "the evaluation before training")

    health = guards.RunHealth(chance_loss)
    bar = progress(total_steps, desc, initial=state.step)
    while state.step < total_steps:
        watchdog.progress(state.step + 1, "train_step")
        metrics = train_step()
        if metrics is None:
            break
        state.step += 1
        bar.update(1)
        # Every step, not only logged ones: the guard needs the reduced metrics, the same on every rank.
        metrics = summarize(metrics) if summarize is not None else metrics
        metrics.update(guards.grad_norms(engines))
        if state.step % run.log_interval == 0 or state.step == total_steps or guards.nonfinite_keys(metrics):
            logger.log(state.step, metrics)
            if postfix is not None:
                bar.set_postfix(**postfix(metrics))
        guards.check_metrics(metrics, step=state.step, lrs=lrs(), output_dir=out)
        health.observe(metrics)
        if state.step == total_steps:
            break
        if run.eval_interval and state.step % run.eval_interval == 0:
            evaluated(state.step, f"the evaluation at step {state.step}")
        if run.save_interval and state.step % run.save_interval == 0:
            watchdog.progress(state.step, "checkpoint")
            guards.check_weights(engines, step=state.step, lrs=lrs(), output_dir=out,
                                 when=f"step {state.step}, before its checkpoint")
            path = checkpoint.save(run.output_dir, state.step, engines, asdict(state), keep=run.save_total_limit,
                                   config=config)
            if on_save is not None:
                on_save(path)
    bar.close()
    for warning in health.warnings():
        logging.getLogger(__name__).warning(warning)
        print0(f"WARNING: {warning}")
    guards.check_weights(engines, step=state.step, lrs=lrs(), output_dir=out,
                         when=f"step {state.step}, the end of training")
    final = evaluated(state.step, f"the final evaluation (step {state.step})")
    memory_plan.report_measured(lambda line: print(line, flush=True))
    return final


def total_optimizer_steps(n_examples: int, args: TrainArgs, gradient_accumulation_steps: int) -> int:
    """Optimizer steps of a run over `n_examples` training examples; none is an error (before anything is built)."""
    if n_examples == 0:
        raise ValueError("no training examples for this step: its --data_split share is 0, or every record was "
                         "dropped or skipped (see the data counts above). Give the step a share (e.g. --data_split "
                         "2,4,4) or more data (--data_path)")
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
        own_norm = guards.local_grad_norm(engine) if boundary and guards.needs_own_grad_norm(engine) else None
        engine.step()
        window.append({"train/loss": loss.detach().float(), **metrics})
        if own_norm is not None:  # DeepSpeed's own optimizers report theirs (fit reads it after the step)
            window[-1]["train/grad_norm"] = own_norm
        if print_loss:
            print(f"[rank {dist.get_rank()}] loss {loss.item():.4f}", flush=True)
        if boundary:
            return window
    return None


def fit_supervised(engine, train_dataset, collate_fn, run: TrainArgs, *, total_steps: int, loss_fn: Callable,
                   evaluate: Callable[[], dict], logger: MetricsLogger, desc: str, config=None,
                   chance_loss: float | None = None) -> dict:
    """`fit` for steps that learn from a fixed dataset (SFT, reward model, DPO): each step is one optimizer step
    over --gradient_accumulation_steps micro-batches of `loss_fn(engine, batch) -> (loss, metrics)`.
    `chance_loss`: the loss of a model that has learned nothing (see `fit`)."""
    state = RunState()
    batches = batch_stream(train_dataset, run.per_device_train_batch_size, collate_fn, run.seed, state,
                           run.num_train_epochs)
    return fit(state=state, total_steps=total_steps, run=run, engines={"model": engine},
               train_step=lambda: supervised_step(engine, batches, loss_fn, run.print_loss), evaluate=evaluate,
               logger=logger, desc=desc, config=config, chance_loss=chance_loss,
               summarize=lambda window: {**mean_over_ranks(window), "train/lr": engine.lr()},
               postfix=lambda m: {"loss": f"{m['train/loss']:.4f}"})


def mean_over_ranks(window: list[dict]) -> dict:
    """Mean over the accumulated micro-batches (those that have the key), then over ranks: stacked on the
    device, one all-reduce and one sync for the whole step."""
    keys = list(dict.fromkeys(k for w in window for k in w))
    dev = dist.device()
    local = torch.stack([torch.stack([torch.as_tensor(w[k], dtype=torch.float64, device=dev) for w in window
                                      if k in w]).mean() for k in keys])
    return dict(zip(keys, dist.all_reduce_mean(local).tolist()))
