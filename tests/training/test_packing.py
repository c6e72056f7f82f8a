"""Padding-free forwards (training/packing.py): a padded batch packed into one row gives every real token what the
padded forward gives it, in every packable family, gradients included; what cannot be packed runs padded."""
from __future__ import annotations

import pytest
import torch

from chatrlhf.training import packing
from chatrlhf.training.hybrid_engine import FAST_PATHS_ENV
from chatrlhf.training.step3_ppo import rollout
from chatrlhf.training.value_model import position_ids, token_values
from chatrlhf.utils.models import load_model, load_tokenizer

PACKABLE = ("llama", "opt", "gpt2", "qwen2", "gpt_neox")


def batch(vocab: int):
    """Left-padded prompts of P=6 and right-padded responses of R=5 (T=11), as step 3 scores them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :2] = 0          # prompt of 4, full response
    mask[1, 9:] = 0          # prompt of 6, response of 3
    mask[2, :5], mask[2, 7:] = 0, 0  # prompt of 1, response of 1
    return ids, mask


def padded_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits


def test_pack_keeps_each_rows_real_tokens_and_unpacks_them_in_place():
    ids = torch.arange(1, 13).view(3, 4)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    p = packing.pack(ids, mask)
    assert p.input_ids.tolist() == [[2, 3, 4, 5, 6, 10, 11]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]] and p.lengths == [3, 2, 2]
    back = p.unpack(p.input_ids.unsqueeze(-1).float(), fill=-1.0).squeeze(-1)
    assert back.tolist() == torch.where(mask.bool(), ids, -1).float().tolist()
    assert p.positions(mask.bool() & (ids % 2 == 0)).tolist() == [0, 2, 4, 5]  # tokens 2, 4, 6, 10
    with pytest.raises(ValueError, match="padding"):
        p.positions(torch.ones(3, 4, dtype=torch.bool))


def test_pack_refuses_what_it_cannot_keep_or_would_not_save():
    ids = torch.ones(2, 4, dtype=torch.long)
    assert packing.pack(ids, torch.ones(2, 4)) is None                       # no padding
    assert packing.pack(ids[:1], torch.tensor([[0, 1, 1, 1]])) is None         # one row
    assert packing.pack(ids, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])) is None  # a gap inside a sequence
    assert packing.pack(ids, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])) is None  # an empty row


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_forward_gives_real_tokens_the_padded_logits(tiny_model_dir, family):
    tok = load_tokenizer(str(tiny_model_dir(family)))
    model = load_model(str(tiny_model_dir(family)), tok, dtype=torch.float32).eval()
    ids, mask = batch(len(tok))
    p = packing.maybe_pack(model, ids, mask)
    assert p is not None and packing.packable(model)
    with torch.no_grad():
        out = packing.call(model, model, p)
        expected = padded_logits(model, ids, mask)
    assert out is not None
    torch.testing.assert_close(p.unpack(out.logits)[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_padded_ones(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.float32)
    ids, mask = batch(len(tok))
    weights = torch.randn(3, 11, len(tok), generator=torch.Generator().manual_seed(1)) * mask[..., None]

    def grads(logits):
        model.zero_grad()
        (logits * weights).sum().backward()
        return {n: q.grad.clone() for n, q in model.named_parameters()}

    p = packing.pack(ids, mask)
    packed, padded = grads(p.unpack(packing.call(model, model, p).logits)), grads(padded_logits(model, ids, mask))
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)


def test_step3_scoring_forwards_run_packed_and_match_the_padded_ones(tiny_model_dir, monkeypatch):
    """The actor's response logits and the critic's values, as step 3's scoring and update take them."""
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    actor = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.float32).eval()
    critic = load_model(str(tiny_model_dir("llama", head="score")), tok, head="score", dtype=torch.float32).eval()
    ids, mask = batch(len(tok))
    calls = []
    real_call = packing.call
    monkeypatch.setattr(packing, "call", lambda *a, **k: calls.append(1) or real_call(*a, **k))
    counted = mask[:, 6:].bool()
    with torch.no_grad():
        fast = rollout._response_logits(actor, ids, mask, 6), token_values(critic, ids, mask)
        monkeypatch.setenv(FAST_PATHS_ENV, "0")
        plain = rollout._response_logits(actor, ids, mask, 6), token_values(critic, ids, mask)
    assert len(calls) == 2  # both fast forwards packed, neither plain one
    torch.testing.assert_close(fast[0][counted], plain[0][counted], rtol=1e-5, atol=1e-5)
    assert bool((fast[0][~counted] == 0).all())
    torch.testing.assert_close(fast[1][mask.bool()], plain[1][mask.bool()], rtol=1e-5, atol=1e-5)


def test_a_model_whose_attention_is_not_one_sdpa_per_layer_is_run_padded_from_then_on(tiny_model_dir, monkeypatch):
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.float32).eval()
    ids, mask = batch(len(tok))
    monkeypatch.setattr(packing, "layer_count", lambda hf: 3)  # the tiny Llama has 2: the check must refuse
    with torch.no_grad():
        assert packing.call(model, model, packing.pack(ids, mask)) is None
        assert packing.maybe_pack(model, ids, mask) is None
        logits = rollout._response_logits(model, ids, mask, 6)  # padded, and right
        expected = padded_logits(model, ids, mask)[:, 5:-1]
    torch.testing.assert_close(logits, expected)


def test_what_is_not_packed(tiny_model_dir, monkeypatch):
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    ids, mask = batch(len(tok))
    bloom = load_model(str(tiny_model_dir("bloom")), tok, dtype=torch.float32)
    assert not packing.packable(bloom) and packing.maybe_pack(bloom, ids, mask) is None  # ALiBi, no position ids
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.float32)
    model.config.sliding_window = 8  # rows of 9 tokens would need a window of 9
    assert packing.maybe_pack(model, ids, mask) is None
    model.config.sliding_window = 9
    assert packing.maybe_pack(model, ids, mask) is not None
    model.config.sliding_window = None
    model.gradient_checkpointing_enable()  # its backward recomputes blocks outside the per-sequence attention
    assert packing.maybe_pack(model, ids, mask) is None
    with torch.no_grad():
        assert packing.maybe_pack(model, ids, mask) is not None
    monkeypatch.setenv(FAST_PATHS_ENV, "0")
    with torch.no_grad():
        assert packing.maybe_pack(model, ids, mask) is None


def _counting_calls(monkeypatch) -> list:
    calls, real_call = [], packing.call
    monkeypatch.setattr(packing, "call", lambda *a, **k: calls.append(1) or real_call(*a, **k))
    return calls


def test_sft_loss_is_the_padded_one_and_backpropagates_alike(tiny_model_dir, monkeypatch):
    from chatrlhf.training.step1_sft.trainer import token_losses

    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.float32)
    ids, mask = batch(len(tok))
    ids, mask = ids[[1, 0]], torch.tensor([[1] * 11, [1] * 7 + [0] * 4])  # right-padded, as step 1's collator does
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :3] = -100  # the prompt
    calls = _counting_calls(monkeypatch)

    def loss_and_grads():
        model.zero_grad()
        total, count = token_losses(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, fp32=True)
        total.backward()
        return total.item(), count.item(), {n: q.grad.clone() for n, q in model.named_parameters()}

    fast = loss_and_grads()
    monkeypatch.setenv(FAST_PATHS_ENV, "0")
    plain = loss_and_grads()
    assert len(calls) == 1 and fast[1] == plain[1] == 8 + 4
    assert fast[0] == pytest.approx(plain[0], rel=1e-5)
    for name in plain[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_logits_are_the_padded_ones_on_real_tokens(tiny_model_dir, monkeypatch):
    from chatrlhf.training.step2_dpo.trainer import logits

    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.float32).eval()
    ids, mask = batch(len(tok))
    calls = _counting_calls(monkeypatch)
    with torch.no_grad():
        fast = logits(model, {"input_ids": ids, "attention_mask": mask})
        monkeypatch.setenv(FAST_PATHS_ENV, "0")
        plain = logits(model, {"input_ids": ids, "attention_mask": mask})
    assert len(calls) == 1
    torch.testing.assert_close(fast[mask.bool()], plain[mask.bool()], rtol=1e-5, atol=1e-5)
