"""One PPO step (scoring, then the update) on fixed sequences with the fast paths on and off; imported by
tests/training/step3_ppo/test_fast_paths.py for one rank and launched by it for two (not collected by pytest).

Both runs start from the same weights, score the same sequences and draw the same minibatch order; each reports
its losses, how many actor forwards it ran, and the weight updates of the actor and critic, so the test compares
them. Fixed sequences, not sampled ones: sampling with weights that agree only to bf16 rounding may pick other
tokens, and then nothing else could be compared.

  deepspeed --num_gpus 2 tests/training/step3_ppo/_fast_paths_step.py --actor DIR --critic DIR --out FILE
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from chatrlhf.training.hybrid_engine import FAST_PATHS_ENV, build_engine
from chatrlhf.training.precision import DTYPES
from chatrlhf.training.step3_ppo import rollout
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.training.step3_ppo.rollout import Rollout, score
from chatrlhf.training.step3_ppo.trainer import Models
from chatrlhf.training.step3_ppo.update import ppo_update
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.config import from_flat
from chatrlhf.utils.models import add_lora, load_model, load_tokenizer

B, P, R = 4, 9, 7  # rows per rank, prompt and response tokens: 64 tokens a forward, past the fp32-kernel cut


def batch(vocab: int, seed: int) -> dict:
    """Left-padded prompts, right-masked responses of different lengths, advantages and returns: all fixed."""
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    for row, pad in enumerate([0, 2, 4, 1]):
        prompt_mask[row, :pad] = 0
    action_mask = torch.zeros(B, R)
    for row, n in enumerate([R, 3, 5, 1]):
        action_mask[row, :n] = 1
    return dict(sequences=torch.randint(3, vocab, (B, P + R), generator=g), prompt_mask=prompt_mask,
                action_mask=action_mask, scores=torch.randn(B, generator=g),
                advantages=torch.randn(B, R, generator=g), returns=torch.randn(B, R, generator=g))


def _copy(state):
    # full_state_dict's CPU tensors are the live parameters themselves (.cpu() of a CPU tensor does not copy)
    return None if state is None else {k: v.clone() for k, v in state.items()}


def one_step(actor_dir: str, critic_dir: str, *, dtype: str, zero_stage: int, fast: bool, seed: int = 0,
             lora: bool = False, checkpointing: bool = False, gather_whole: bool | None = None) -> dict:
    """`lora`: adapters (rank 4) on actor and critic, base frozen, the reference the adapters-off actor.
    `checkpointing`: gradient checkpointing on actor and critic (recomputed blocks use the forward's kernels).
    `gather_whole` (ZeRO-3, default `fast`): the trained models' training forwards gather them whole."""
    gather_whole = fast if gather_whole is None else gather_whole
    os.environ[FAST_PATHS_ENV] = "1" if fast else "0"
    torch.manual_seed(seed)  # LoRA's A matrices and fresh heads are drawn alike in both runs
    tok = load_tokenizer(actor_dir, padding_side="left")
    cfg = from_flat(PPOConfig, dict(dtype=dtype, per_device_generation_batch_size=B, per_device_training_batch_size=B,
                                    max_answer_seq_len=R, whiten_advantages=False))

    def engine(path, head, trainable):
        model = load_model(path, tok, head=head, dtype=DTYPES[dtype], dropout=0.0,
                           gradient_checkpointing=checkpointing and trainable)
        if lora and trainable:
            model = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=True, head=head)
        return build_engine(model, zero_stage=zero_stage if trainable else 0, dtype=dtype, micro_batch_size=B,
                            learning_rate=1e-3, lora_learning_rate=1e-3, lr_scheduler_type="constant",
                            trainable=trainable, gather_whole=gather_whole)

    actor, critic = engine(actor_dir, "causal_lm", True), engine(critic_dir, "score", True)
    ref = None if lora else engine(actor_dir, "causal_lm", False)
    before = {name: _copy(e.full_state_dict()) for name, e in (("actor", actor), ("critic", critic))}
    data = batch(len(tok), seed + dist.get_rank())
    forwards = []
    plain = rollout._response_logits

    def counted(model, *args):
        forwards.append(model is actor)
        return plain(model, *args)

    rollout._response_logits = counted
    try:
        out = score(actor, ref, critic, data["sequences"], data["prompt_mask"], data["action_mask"],
                    temperature=1.0, chunk=B, ref_is_actor_without_adapters=lora)
        held = [e.gathered_whole for e in (actor, critic)]  # gathered whole by the scoring forwards?
        r = Rollout(sequences=data["sequences"], action_mask=data["action_mask"], prompt_len=P,
                    scores=data["scores"], **out)
        r.advantages, r.returns = data["advantages"], data["returns"]
        torch.manual_seed(seed)  # the same minibatch order in both runs
        metrics = ppo_update(Models(actor=actor, critic=critic, ref=ref, reward=None, tokenizer=tok), r, cfg)
    finally:
        rollout._response_logits = plain
    after = {name: e.full_state_dict() for name, e in (("actor", actor), ("critic", critic))}
    held_after = [e.gathered_whole for e in (actor, critic)]  # released by their optimizer steps?
    result = {"metrics": {k: float(v) for k, v in metrics.items()}, "actor_forwards": sum(forwards),
              "gathered_whole": held, "gathered_whole_after": held_after,
              "logprobs": out["logprobs"].tolist(), "values": out["values"].tolist(),
              "action_mask": data["action_mask"].tolist()}
    if dist.is_main_process():  # full_state_dict is rank 0's
        result["updates"] = {name: {k: (after[name][k].float() - before[name][k].float())
                                    for k in after[name] if after[name][k].is_floating_point()}
                             for name in after}
    return result


def compare(fast: dict, slow: dict) -> dict:
    """Relative differences between the two runs: per metric, and of the weight updates (norm of the difference
    over norm of the update) per model."""
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-6)  # noqa: E731
    # Over the tokens that count: the packed forwards leave padding's log-probs and values at 0.
    counted = torch.tensor(slow["action_mask"]).bool()
    diff = lambda key: (torch.tensor(fast[key]) - torch.tensor(slow[key]))[counted].abs().max().item()  # noqa: E731
    out = {"metrics": {k: rel(fast["metrics"][k], slow["metrics"][k]) for k in slow["metrics"]},
           "actor_forwards": (fast["actor_forwards"], slow["actor_forwards"]),
           "logprobs": diff("logprobs"), "values": diff("values")}
    if "updates" in slow:
        out["updates"] = {}
        for name, updates in slow["updates"].items():
            diff = sum(float((fast["updates"][name][k] - u).square().sum()) for k, u in updates.items())
            norm = sum(float(u.square().sum()) for u in updates.values())
            out["updates"][name] = {"relative_difference": (diff / max(norm, 1e-30)) ** 0.5, "norm": norm ** 0.5}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actor", required=True)
    ap.add_argument("--critic", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    dist.init_distributed()
    torch.set_num_threads(1)
    results = {}
    for dtype in ("fp32", "bf16"):
        runs = {fast: one_step(args.actor, args.critic, dtype=dtype, zero_stage=2, fast=fast) for fast in (True, False)}
        results[dtype] = compare(runs[True], runs[False])
    # ZeRO-3: every fast path against none, and the whole-model gather alone against DeepSpeed's per-layer one.
    runs = {fast: one_step(args.actor, args.critic, dtype="fp32", zero_stage=3, fast=fast) for fast in (True, False)}
    results["zero3_fp32"] = compare(runs[True], runs[False])
    whole = {on: one_step(args.actor, args.critic, dtype="fp32", zero_stage=3, fast=True, gather_whole=on)
             for on in (True, False)}
    results["zero3_gather_whole"] = compare(whole[True], whole[False])
    results["zero3_gather_whole"]["gathered_whole"] = {str(on): (r["gathered_whole"], r["gathered_whole_after"])
                                                       for on, r in whole.items()}
    if dist.is_main_process():
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()


if __name__ == "__main__":
    dist.run_as_process(main)  # a rank: no interpreter teardown (see there)
