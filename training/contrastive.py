"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

Each step takes the `top_k` most likely next tokens as candidates and keeps the one with the best
(1 - alpha) * p(token) - alpha * (largest cosine similarity between its last-layer hidden state and those of the
tokens before it), which penalises repeating what was said. transformers 5 runs it only as code fetched from the
Hub, which chatrlhf does not run; prompt_eval's --penalty_alpha uses this one. It recomputes the whole sequence at
every step (no KV cache): meant for evaluation-sized answers, not for training rollouts.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


@torch.no_grad()
def contrastive_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, top_k: int,
                       penalty_alpha: float, max_new_tokens: int, pad_token_id: int,
                       eos_token_id: int | None) -> torch.Tensor:
    """input_ids, attention_mask: (B, T), left-padded -> (B, T + n), n <= max_new_tokens; a row that has emitted
    EOS is continued with pad_token_id, as transformers' generate does."""
    if top_k < 2:
        raise ValueError(f"contrastive search needs top_k >= 2 candidates, got {top_k}")
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(ids, mask):
        extra = {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)} if takes_positions else {}
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False, **extra)
        return out.logits[:, -1].float(), out.hidden_states[-1].float()

    batch, k = input_ids.size(0), top_k
    ids, mask = input_ids, attention_mask
    logits, hidden = forward(ids, mask)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    rows = torch.arange(batch, device=ids.device)
    for _ in range(max_new_tokens):
        top_p, top_i = logits.softmax(-1).topk(k, dim=-1)                        # (B, k)
        cand_ids = torch.cat([ids.repeat_interleave(k, 0), top_i.reshape(-1, 1)], dim=1)
        cand_mask = torch.cat([mask.repeat_interleave(k, 0), mask.new_ones(batch * k, 1)], dim=1)
        cand_logits, cand_hidden = forward(cand_ids, cand_mask)                  # (Bk, V), (Bk, T+1, d)
        new = F.normalize(cand_hidden[:, -1], dim=-1)                            # (Bk, d)
        context = F.normalize(hidden, dim=-1).repeat_interleave(k, 0)            # (Bk, T, d)
        similarity = (context @ new.unsqueeze(-1)).squeeze(-1)                   # (Bk, T)
        similarity = similarity.masked_fill(mask.repeat_interleave(k, 0) == 0, float("-inf"))
        score = (1 - penalty_alpha) * top_p.reshape(-1) - penalty_alpha * similarity.max(dim=-1).values
        best = score.view(batch, k).argmax(dim=-1)                               # (B,)
        token = torch.where(done, torch.full_like(best, pad_token_id), top_i[rows, best])
        ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=1)
        mask = torch.cat([mask, (~done)[:, None].to(mask.dtype)], dim=1)
        if eos_token_id is not None:
            done |= token == eos_token_id
        pick = rows * k + best
        logits, hidden = cand_logits[pick], cand_hidden[pick]
        if bool(done.all()):
            break
    return ids
