"""Contrastive search: one step checked against its definition by hand, and greedy decoding as alpha -> 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chatrlhf.training.contrastive import contrastive_search
from chatrlhf.training.generation import generate
from chatrlhf.utils.models import load_model, load_tokenizer


def _model(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    tok = load_tokenizer(path, padding_side="left")
    model = load_model(path, tok)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)  # random answers that depend on the prompt
    return model.eval(), tok


def test_one_step_by_hand(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    mask = torch.ones_like(ids)
    k, alpha = 4, 0.6
    out = contrastive_search(model, ids, mask, top_k=k, penalty_alpha=alpha, max_new_tokens=1, pad_token_id=0,
                             eos_token_id=None)
    with torch.no_grad():
        first = model(input_ids=ids, output_hidden_states=True)
        probs = first.logits[0, -1].softmax(-1)
        context = first.hidden_states[-1][0]  # (T, d)
        best, best_score = None, -float("inf")
        for token in probs.topk(k).indices.tolist():
            h = model(input_ids=torch.cat([ids, torch.tensor([[token]])], 1), output_hidden_states=True)
            new = h.hidden_states[-1][0, -1]
            penalty = F.cosine_similarity(context, new[None], dim=-1).max()
            score = (1 - alpha) * probs[token] - alpha * penalty
            if score > best_score:
                best, best_score = token, score
    assert out.shape == (1, 6) and out[0, -1].item() == best


def test_vanishing_penalty_is_greedy_and_stops_at_eos_with_left_padding(tiny_model_dir):
    model, tok = _model(tiny_model_dir)
    enc = tok(["hello there", "How do I bake bread today?"], return_tensors="pt", padding=True)
    greedy = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=6, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, do_sample=False)
    ours = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=6, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, do_sample=False, top_k=4, penalty_alpha=1e-9)
    assert torch.equal(ours, greedy[:, :ours.size(1)])
