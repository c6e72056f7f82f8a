"""The RL loop: rollout -> score -> learned scores, shaped rewards -> advantages -> PPO epochs -> log, checkpoint.

The stages live in `experience.py` (rollouts, rewards, advantages) and `update.py` (the PPO epochs); the math in
`core.py` and `estimators.py`. Every rank keeps every sequence it sampled (short or EOS-less answers are masked or
penalised, never dropped), so batch shapes agree across ranks.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.training import guards
from chatrlhf.training.hybrid_engine import HybridEngine
from chatrlhf.training.loop import RunState, batch_stream, fit
from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo.controllers import AdaptiveKLController, FixedKLController, RunningMoments
from chatrlhf.training.step3_ppo.data import PromptCollator
from chatrlhf.training.step3_ppo.ema import ActorEMA
from chatrlhf.training.step3_ppo.experience import make_rollout, shape_and_estimate
from chatrlhf.training.step3_ppo.rewards import Reward, reward_names
from chatrlhf.training.step3_ppo.rollout import Rollout, concat
from chatrlhf.training.step3_ppo.update import ppo_update
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.logging import print0


@dataclass
class Models:
    """Every model step 3 runs."""
    actor: HybridEngine             # trainable, generates
    critic: HybridEngine | None     # trainable; None for estimators that need no critic
    ref: HybridEngine | None        # frozen; None: no reference (--kl_coef 0), or the actor without its adapters
    reward: Reward                  # a reward model, reward functions or a weighted sum, behind one call
    tokenizer: "PreTrainedTokenizerBase"  # noqa: F821  the actor's (and critic's)
    ema: ActorEMA | None = None     # EMA of the actor's weights
    generator: "VLLMGenerator | None" = None  # noqa: F821  --generation_backend vllm: samples for the actor
    ref_is_actor_without_adapters: bool = False  # LoRA with a frozen base: the reference is the adapters-off actor

    @property
    def trained(self) -> dict:
        """The engines a checkpoint holds."""
        return {name: e for name, e in (("actor", self.actor), ("critic", self.critic)) if e is not None}


# ---- evaluation on held-out prompts ----------------------------------------------------------------------
@torch.no_grad()
def evaluate(models: Models, loader, cfg, max_batches: int, step: int | None = None) -> dict:
    """Score (and each reward's own, eval/reward/<name>), KL to the reference, length and the share of answers that
    end with EOS on held-out prompts, one answer each of at most --eval_max_answer_seq_len tokens; sampled with a
    fixed seed (or greedy with --eval_greedy) so that evaluations before and after training see the same
    randomness, every random generator (CPU and each accelerator device) restored afterwards: an evaluation never
    changes the training's randomness. With `step`, every answer is also written to
    <output_dir>/eval_answers/step<step>-rank<rank>.jsonl (prompt, answer, score, length, eos, kl), for the
    pipeline's report to compare two evaluations answer by answer."""
    sampling = dict(cfg.generation.sampling(), do_sample=False) if cfg.eval_greedy else None
    sums: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    timings: dict[str, float] = {}
    with dist.fork_rng():
        torch.manual_seed(cfg.run.seed)
        dist.accelerator().manual_seed_all(cfg.run.seed)
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            # No critic: its values are not part of an evaluation.
            r = make_rollout(models, batch, cfg, timings, sampling=sampling, max_new_tokens=cfg.eval_answer_len,
                             values=False)
            kl = (torch.zeros_like(r.scores) if r.ref_logprobs is None
                  else core.masked_sum(r.logprobs - r.ref_logprobs, r.action_mask, dim=1))
            scores = r.scores.double()
            eos = r.has_eos if r.has_eos is not None else torch.zeros_like(r.scores, dtype=torch.bool)
            batch_sums = {"score": scores.sum(), "square": scores.square().sum(), "kl": kl.double().sum(),
                          "length": r.action_mask.double().sum(), "eos": eos.double().sum(),
                          "n": scores.new_tensor(float(len(scores)))}
            batch_sums.update({f"reward/{k}": v.double().sum() for k, v in (r.reward_parts or {}).items()})
            for k, v in batch_sums.items():  # summed on the device: no sync per batch
                sums[k] = sums.get(k, 0.0) + v
            if step is not None:
                rows += _eval_rows(r, models.tokenizer, kl, eos, batch.get("prompt_messages"), first=len(rows))
    # The same keys on every rank, in one order (a rank without an eval batch still joins the all-reduce).
    keys = ["eos", "kl", "length", "n", "score", "square"] + [f"reward/{name}" for name in reward_names(models.reward)]
    totals = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=dist.device()) for k in keys])
    totals = dict(zip(keys, dist.all_reduce_sum(totals).cpu().tolist()))
    n = max(totals.pop("n", 0.0), 1.0)
    score, square = totals.pop("score", 0.0), totals.pop("square", 0.0)
    # The spread of the answers' scores, so that a before/after difference can be read against it.
    std = max(square / n - (score / n) ** 2, 0.0) ** 0.5
    out = {"eval/score_mean": score / n, "eval/score_std": std, "eval/kl": totals.pop("kl", 0.0) / n,
           "eval/response_length": totals.pop("length", 0.0) / n, "eval/eos_fraction": totals.pop("eos", 0.0) / n,
           "eval/answers": n}
    out.update({f"eval/{k}": v / n for k, v in totals.items()})
    # This rank's seconds (the evaluations can be most of a short run's time: where they go).
    out.update({f"eval/time_{k}": v for k, v in timings.items()})
    if models.generator is not None:
        mismatch, tokens = dist.all_reduce_sum(torch.tensor(models.generator.pop_totals(), dtype=torch.float64,
                                                            device=dist.device())).tolist()
        out["eval/vllm_logprob_mismatch"] = mismatch / max(tokens, 1.0)
    if step is not None and cfg.run.output_dir:
        write_eval_answers(cfg.run.output_dir, step, rows)
    return out


def _eval_rows(r: Rollout, tokenizer, kl: torch.Tensor, eos: torch.Tensor, messages, first: int) -> list[dict]:
    """The rollout's answers as `_answers` rows plus row index, length, eos and KL; the prompt as its chat messages
    where the data has them (the collator has parsed them already)."""
    rows = _answers(r, tokenizer, show=False)
    for i, row in enumerate(rows):
        row.update(row=first + i, length=int(r.action_mask[i].sum()), eos=bool(eos[i]), kl=float(kl[i]))
        if messages:
            row["prompt"] = messages[i]
    return rows


def write_eval_answers(output_dir, step: int, rows: list[dict]) -> None:
    """This rank's evaluation answers at `step`, one JSON object a line (rewritten when a resumed run evaluates
    the same step again)."""
    folder = Path(output_dir) / "eval_answers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step{step}-rank{dist.get_rank()}.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


# ---- the loop -------------------------------------------------------------------------------------------
def train(models: Models, prompts, eval_loader, cfg, logger, total_steps: int, ptx_batches=None) -> dict:
    """RL on `prompts` (the training prompt Dataset) for `total_steps` iterations; returns the final evaluation.

    One step: rollouts of --n_samples_per_prompt answers to --generation_batches prompt batches, learned scores,
    rewards and advantages, PPO epochs, the KL controller; `fit` does the cadence (log, evaluate, checkpoint,
    resume)."""
    p, run = cfg.ppo, cfg.run
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(p.kl_coef))
    moments = RunningMoments() if p.normalize_scores else None
    state = RunState(extra={"kl_coef": kl_ctl.value, "score_moments": None, "ptx_batches": 0})
    batches = batch_stream(prompts, cfg.per_device_generation_batch_size, PromptCollator(models.tokenizer), run.seed,
                           state, run.num_train_epochs, group=p.generation_batches)
    if ptx_batches is not None:
        ptx_batches = _counted(ptx_batches, state)

    def train_step() -> dict | None:
        group = next(batches, None)
        if group is None:
            return None
        # 1-2. rollouts scored in eval mode; each prompt's answers share a group index
        timings: dict = {}
        offsets = [0]
        for b in group[:-1]:
            offsets.append(offsets[-1] + b["input_ids"].size(0))
        r = concat([make_rollout(models, b, cfg, timings, n_samples=p.n_samples_per_prompt, group_offset=o)
                    for b, o in zip(group, offsets)], models.tokenizer.pad_token_id)
        guards.check_rollout(r, step=state.step + 1, engines=models.trained,
                             output_dir=run.output_dir)  # NaN/inf stop here, before the update
        t1 = time.time()
        # 3-4. learned scores, rewards, advantages
        metrics = shape_and_estimate(r, cfg, kl_ctl.value, moments)
        # 5. PPO epochs
        metrics.update(ppo_update(models, r, cfg, ptx_batches, kl_coef=kl_ctl.value))
        if models.generator is not None:  # mean |vLLM - actor| log-prob of the sampled tokens: the engines agree?
            metrics.update(models.generator.pop_metrics("rollout"))
        t2 = time.time()
        # 6. step metrics (the mean over ranks), KL controller, answers
        generated = dist.all_reduce_sum(r.action_mask.sum().to(dist.device())).item()
        t_total = timings["generation"] + timings["scoring"] + t2 - t1
        metrics.update({"time/generation": timings["generation"], "time/scoring": timings["scoring"],
                        "time/training": t2 - t1, "time/step": t_total,
                        "throughput/generated_tokens_per_second": generated / max(timings["generation"], 1e-9),
                        "throughput/tokens_per_second": generated / max(t_total, 1e-9)})
        # The mean over ranks of every metric in one all-reduce (one per metric cost ~19 collectives a step).
        keys = list(metrics)
        local = torch.stack([torch.as_tensor(metrics[k]).detach().to(dist.device(), torch.float64).reshape(())
                             for k in keys])  # stacked on the device: one sync for all of them, not one per metric
        metrics = dict(zip(keys, dist.all_reduce_mean(local).tolist()))
        # The KL controller reads the same mean (no collective of its own).
        kl_ctl.update(metrics["objective/kl"], r.sequences.size(0) * dist.get_world_size())
        state.extra.update(kl_coef=kl_ctl.value, score_moments=moments.state_dict() if moments is not None else None)
        # Sample answers: printed with --print_answers; in samples.jsonl (and a wandb table) with either flag.
        if (cfg.print_answers or run.report_to != "none") and (state.step + 1) % cfg.print_answers_interval == 0:
            logger.samples(state.step + 1, _answers(r, models.tokenizer, show=cfg.print_answers))
        return metrics

    def on_resume(path):
        kl_ctl.value = state.extra["kl_coef"]
        if moments is not None and state.extra.get("score_moments"):
            moments.load_state_dict(state.extra["score_moments"])
        if models.ema is not None:
            models.ema.load(path)

    return fit(state=state, total_steps=total_steps, run=run, engines=models.trained,
               train_step=train_step,
               evaluate=lambda: evaluate(models, eval_loader, cfg, run.eval_iters, step=state.step),
               logger=logger, desc=f"step 3 {p.advantage_estimator}", config=cfg, on_resume=on_resume,
               on_save=models.ema.save if models.ema is not None else None,
               postfix=lambda m: {"score": f"{m['objective/scores']:.3f}", "kl": f"{m['objective/kl']:.3f}"})


def _counted(batches, state: RunState):
    """The pretraining-mix stream moved past the batches a resumed run already used, and counted into `state`."""
    for _ in range(state.extra["ptx_batches"]):
        next(batches)
    for batch in batches:
        state.extra["ptx_batches"] += 1
        yield batch


def _answers(r: Rollout, tokenizer, show: bool) -> list[dict]:
    """This rank's answers as {prompt, answer, score} rows; `show` prints the first (DeepSpeed-Chat's
    --print_answers)."""
    rows = []
    for i in range(r.sequences.size(0)):
        n = int(r.action_mask[i].sum())
        rows.append({"prompt": tokenizer.decode(r.sequences[i, :r.prompt_len], skip_special_tokens=True),
                     "answer": tokenizer.decode(r.responses[i, :n], skip_special_tokens=True),
                     "score": r.scores[i].item()})
    if show:
        print0(f"--- prompt: {rows[0]['prompt'][-300:]!r}\n--- answer: {rows[0]['answer']!r}\n"
               f"--- score: {rows[0]['score']:.3f}")
    return rows
