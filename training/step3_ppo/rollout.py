"""Rollouts: sample answers with the actor (generation mode), then score them with every model (eval mode).

Shapes: B sequences, P prompt tokens (left-padded), R response tokens (right-padded). Position t of every
(B, R) tensor is response token t: `logprobs[:, t]` is its log-probability, `values[:, t]` the critic's
estimate before emitting it, `action_mask[:, t]` whether it counts (up to and including the first EOS).
With --n_samples_per_prompt N the N answers to a prompt sit in consecutive rows sharing a `group` index.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch

from chatrlhf.training import packing
from chatrlhf.training.step3_ppo import core
from chatrlhf.training.value_model import position_ids, token_values, unwrap


@dataclass
class Rollout:
    sequences: torch.Tensor        # (B, P+R) prompt + response ids
    attention_mask: torch.Tensor   # (B, P+R) 1 on prompt tokens and counted response tokens
    action_mask: torch.Tensor      # (B, R) float, 1 on counted response tokens
    logprobs: torch.Tensor         # (B, R) actor, when sampled (old_logprobs in PPO)
    ref_logprobs: torch.Tensor | None  # (B, R) reference model; None without one (--kl_coef 0)
    values: torch.Tensor | None    # (B, R) critic (old_values in PPO); None for critic-free estimators
    scores: torch.Tensor           # (B,) the reward as scored (before normalisation, clip, missing-EOS penalty)
    prompt_len: int                # P
    has_eos: torch.Tensor | None = None     # (B,) bool: the answer ended with EOS (not cut at the length limit)
    group: torch.Tensor | None = None       # (B,) long: the answers to one prompt share it
    reward_parts: dict | None = None        # {name: (B,)} each reward's own scores, when several are summed
    rewards: torch.Tensor | None = None     # (B, R) shaped: score at the last token, -KL per token
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None     # (B, R)

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows `index` of every per-sequence tensor (a PPO minibatch)."""
        return Rollout(**{f.name: _rows(getattr(self, f.name), index) for f in fields(self)})


def _rows(value, index):
    if isinstance(value, dict):
        return {k: v[index] for k, v in value.items()}
    return value[index] if isinstance(value, torch.Tensor) else value


def _cat(values: list):
    if values[0] is None:
        return None
    if isinstance(values[0], dict):
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)


def concat(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from several generation batches (prompts and responses re-padded to common widths); their
    `group` indices must already differ (make_rollout's group_offset)."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_len for r in rollouts)
    R = max(r.action_mask.size(1) for r in rollouts)
    parts = []
    for r in rollouts:
        left, right = P - r.prompt_len, R - r.action_mask.size(1)
        pad_rows = lambda t, v: None if t is None else torch.nn.functional.pad(t, (0, right), value=v)  # noqa: E731
        parts.append(dict(
            sequences=torch.nn.functional.pad(r.sequences, (left, right), value=pad_id),
            attention_mask=torch.nn.functional.pad(r.attention_mask, (left, right), value=0),
            action_mask=pad_rows(r.action_mask, 0.0), logprobs=pad_rows(r.logprobs, 0.0),
            ref_logprobs=pad_rows(r.ref_logprobs, 0.0), values=pad_rows(r.values, 0.0), scores=r.scores,
            has_eos=r.has_eos, group=r.group, reward_parts=r.reward_parts))
    return Rollout(**{k: _cat([p[k] for p in parts]) for k in parts[0]}, prompt_len=P)


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) ids -> (action_mask float (B, R): tokens up to and including the first EOS, has_eos bool (B,))."""
    is_eos = responses == eos_id
    before_or_at_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return before_or_at_eos.float(), is_eos.any(1)


def forward_kwargs(model, attention_mask: torch.Tensor, response_len: int) -> dict:
    """Position ids counting real tokens (as `generate` did for the left-padded prompt), and only the logits
    we need when the family supports it (a (B, P+R, V) fp32 tensor is the biggest thing in PPO): the R positions
    that predict response tokens, as an index tensor. An int `logits_to_keep` makes transformers slice the hidden
    states into a non-contiguous view, and under no_grad the head then copied its (V, H) weight once per row
    (SmolLM2: 689 ms vs 23 ms); indexing hands the head a contiguous copy. Same values either way."""
    params = inspect.signature(unwrap(model).forward).parameters
    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids(attention_mask)
    if "logits_to_keep" in params:
        T = attention_mask.size(1)
        kwargs["logits_to_keep"] = (torch.arange(T - response_len - 1, T - 1, device=attention_mask.device)
                                    if fast_paths_enabled() else response_len + 1)
    return kwargs


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, R, V) logits that predict the response tokens (the stashed scoring forward when it is this one)."""
    stashed = _take_stashed(model, "logits", sequences, attention_mask)
    return stashed if stashed is not None else _response_logits(model, sequences, attention_mask, prompt_len)


def _response_logits(model, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    R = sequences.size(1) - prompt_len
    logits = _packed_response_logits(model, sequences, attention_mask, R)
    if logits is not None:
        return logits
    kwargs = forward_kwargs(model, attention_mask, R)
    logits = model(input_ids=sequences, **kwargs).logits
    return logits if isinstance(kwargs.get("logits_to_keep"), torch.Tensor) else logits[:, -(R + 1):-1]


def _packed_response_logits(model, sequences, attention_mask, R: int) -> torch.Tensor | None:
    """(B, R, V) logits from a padding-free forward (`chatrlhf.training.packing`), zeros where the response token
    is padding (it does not count); None where packing does not apply."""
    counted = attention_mask[:, -R:].bool()  # (B, R)
    predicting = torch.nn.functional.pad(counted, (attention_mask.size(1) - R - 1, 1))  # (B, T): the positions before
    logits = packing.logits_at(model, unwrap(model), sequences, attention_mask, predicting)
    if logits is None:
        return None
    return logits.new_zeros(counted.shape + logits.shape[-1:]).index_put((counted,), logits)


def response_values(critic, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """(B, R) critic values of the states before each response token (the stashed scoring forward when it is
    this one)."""
    stashed = _take_stashed(critic, "values", sequences, attention_mask)
    return stashed if stashed is not None else _response_values(critic, sequences, attention_mask, prompt_len)


def _response_values(critic, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    return token_values(critic, sequences, attention_mask)[:, prompt_len - 1:-1].float()


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """(B, R, V), (B, R) -> (log-probs (B, R) fp32 with their graph, entropy (B, R) fp32 without): one pass per
    row shares the fp32 copy and the logsumexp that `core.logprobs_from_logits` and `core.entropy_from_logits`
    each compute on their own (the same formulas, so the same values). The entropy is a metric: no gradient."""
    logprobs, entropy = [], []
    for row_logits, row_tokens in zip(logits, tokens):
        z = row_logits.float() / temperature
        logz = torch.logsumexp(z, dim=-1, keepdim=True)
        logprobs.append(z.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1) - logz.squeeze(-1))
        with torch.no_grad():
            zd, logzd = z.detach(), logz.detach()
            entropy.append((logzd - ((zd - logzd).exp() * zd).sum(-1, keepdim=True)).squeeze(-1))
    return torch.stack(logprobs), torch.stack(entropy)


# ---- the scoring forward reused as the first training forward ------------------------------------------
# When the update's first minibatch is the whole rollout (one minibatch per epoch) and no dropout is active, the
# first training forward computes exactly what scoring computed: the old log-probs and values, with the actor and
# critic not yet updated (ratio 1). `score` then runs those two forwards with their graph and stashes them on the
# engine; the update's `response_logits` / `response_values` take them (rows matched by content, so the update's
# shuffled order is fine) instead of a second forward. A stash lives until taken, the engine's next step() or its
# next generation; anything else (another minibatch size, a ZeRO-3 layer trace...) simply runs the forward.

def fast_paths_enabled() -> bool:
    from chatrlhf.training.hybrid_engine import fast_paths_enabled as enabled

    return enabled()


def _can_stash(model, rows: int, minibatch: int | None) -> bool:
    return (torch.is_grad_enabled() and fast_paths_enabled() and hasattr(model, "stash")
            and getattr(model, "trainable", False) and (minibatch is None or minibatch >= rows)
            and dropout_free(model))


def dropout_free(model) -> bool:
    """No dropout anywhere in `model` (modules, LoRA's included, and the config's functional attention dropout):
    its training-mode forward is its eval-mode forward."""
    hf = unwrap(model)
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in hf.modules()):
        return False
    config = getattr(hf, "config", None)
    items = config.to_dict().items() if config is not None else ()
    return not any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v > 0 for k, v in items)


def _stash(model, key: str, sequences, attention_mask, value: torch.Tensor) -> None:
    model.stash[key] = (sequences, attention_mask, value)


def _take_stashed(model, key: str, sequences, attention_mask):
    """The stashed forward of `key` if it saw exactly these rows (in any order), else None; taken either way."""
    stash = getattr(model, "stash", None)
    entry = stash.pop(key, None) if isinstance(stash, dict) else None
    if entry is None or not torch.is_grad_enabled():
        return None
    seen_ids, seen_mask, value = entry
    if seen_ids.shape != sequences.shape or seen_ids.device != sequences.device:
        return None
    same = ((sequences[:, None] == seen_ids[None]).all(-1)
            & (attention_mask[:, None] == seen_mask[None]).all(-1))  # (B new, B seen)
    order, free = [], set(range(seen_ids.size(0)))
    for row in range(sequences.size(0)):  # identical rows are interchangeable: any unused equal row will do
        match = next((j for j in same[row].nonzero().flatten().tolist() if j in free), None)
        if match is None:
            return None
        free.discard(match)
        order.append(match)
    if order == list(range(len(order))):
        return value
    return value[torch.tensor(order, device=value.device)]


@torch.no_grad()
def generate(actor, prompts: torch.Tensor, prompt_mask: torch.Tensor, *, tokenizer, sampling: dict,
             max_new_tokens: int, **mode):
    """(B, P) left-padded prompts -> (sequences (B, P+R), action_mask (B, R), has_eos (B,)).

    `mode`: the hybrid engine's generation settings (HybridEngineArgs.generation_mode()). Generation stops at
    EOS; positions after it are padding and get action_mask 0."""
    with actor.generation(**mode) as gen:
        sequences = gen(prompts, prompt_mask, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, **sampling)
    P = prompts.size(1)
    action_mask, has_eos = response_mask(sequences[:, P:], tokenizer.eos_token_id)
    if action_mask.size(1) == 0:  # nothing generated at all (max_new_tokens 0): keep shapes valid
        raise ValueError("--max_answer_seq_len must be at least 1")
    return sequences, action_mask, has_eos


def score(actor, ref, critic, sequences, prompt_mask, action_mask, *, temperature: float,
          ref_is_actor_without_adapters: bool = False, chunk: int | None = None) -> dict:
    """Log-probs (actor, reference) and values (critic), all in eval mode, `chunk` rows at a time (a rollout's
    logits need not fit at once). Without a reference (ref None and not the actor without its adapters)
    ref_logprobs is None; without a critic, values is None.

    Called with gradients enabled (a training rollout) and `chunk` (the PPO minibatch) covering every row, the
    actor's and critic's forwards keep their graph for the update's first minibatch (see `_can_stash`); the
    values returned are detached and the same."""
    P = prompt_mask.size(1)
    attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
    rows = sequences.size(0)
    stash = {m: _can_stash(m, rows, chunk) for m in (actor, critic) if m is not None}
    for m in (actor, critic):
        if m is not None:
            m.eval()  # old log-probs and values without dropout noise
            if hasattr(m, "stash"):
                m.stash.clear()
    step = chunk or rows
    out = {"logprobs": [], "ref_logprobs": [], "values": []}
    for start in range(0, rows, step):
        ids, mask = sequences[start:start + step], attention_mask[start:start + step]
        responses = ids[:, P:]
        with torch.no_grad():
            # The reference first: with LoRA it is the actor itself, whose stashed graph comes after.
            if ref_is_actor_without_adapters:
                with actor.module.disable_adapter():
                    ref_logits = _response_logits(actor, ids, mask, P)
                out["ref_logprobs"].append(core.logprobs_from_logits(ref_logits, responses, temperature))
            elif ref is not None:
                out["ref_logprobs"].append(core.logprobs_from_logits(_response_logits(ref, ids, mask, P), responses,
                                                                     temperature))
        if stash[actor]:
            logits = _with_graph(actor, lambda: _response_logits(actor, ids, mask, P))
            _stash(actor, "logits", ids, mask, logits)
            logits = logits.detach()
        else:
            with torch.no_grad():
                logits = _response_logits(actor, ids, mask, P)
        with torch.no_grad():
            out["logprobs"].append(core.logprobs_from_logits(logits, responses, temperature))
        if critic is not None and stash[critic]:
            values = _with_graph(critic, lambda: _response_values(critic, ids, mask, P))
            _stash(critic, "values", ids, mask, values)
            out["values"].append(values.detach())
        elif critic is not None:
            with torch.no_grad():
                out["values"].append(_response_values(critic, ids, mask, P))
    return dict(attention_mask=attention_mask, **{k: torch.cat(v) if v else None for k, v in out.items()})


def _with_graph(model, forward):
    """`forward()` in training mode with its graph (the update's own forward, run early), back to eval after."""
    model.train()
    try:
        return forward()
    finally:
        model.eval()
