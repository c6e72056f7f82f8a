"""The one generation call (chatrlhf.training.generation.generate) samples exactly the distribution whose
log-probabilities PPO computes: a checkpoint's generation_config cannot change it."""
from __future__ import annotations

import pytest
import torch

from chatrlhf.training.generation import generate, sample_categorical
from chatrlhf.training.value_model import position_ids
from chatrlhf.utils.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    tok = load_tokenizer(path, padding_side="left")
    model = load_model(path, tok, head="causal_lm").eval()
    enc = tok(["hello there", "The quick brown fox"], return_tensors="pt", padding=True)
    return model, tok, enc


@torch.no_grad()
def plain_greedy(model, tok, enc, steps: int = STEPS) -> torch.Tensor:
    """Argmax of the model's own next-token distribution, one full forward per token: nothing but the model."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    done = torch.zeros(ids.size(0), dtype=torch.bool)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        nxt = torch.where(done, torch.full_like(logits[:, 0], tok.pad_token_id, dtype=torch.long), logits.argmax(-1))
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, (~done).long()[:, None]], 1)
        done |= nxt == tok.eos_token_id
    return ids


def ours(model, tok, enc, **sampling):
    return generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=STEPS,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)


def test_a_checkpoints_generation_config_does_not_reach_rollouts(model_and_batch):
    model, tok, enc = model_and_batch
    expected = plain_greedy(model, tok, enc)
    saved = model.generation_config
    assert torch.equal(ours(model, tok, enc, do_sample=False), expected)
    torch.manual_seed(0)
    sampled = ours(model, tok, enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    first = int(expected[0, enc["input_ids"].size(1)])
    try:
        # What a checkpoint's generation_config.json may hold; transformers 5 fills every field we leave unset.
        model.generation_config = type(saved)(
            no_repeat_ngram_size=1, min_new_tokens=30, repetition_penalty=5.0, bad_words_ids=[[first]],
            suppress_tokens=[first], top_k=3, temperature=0.3, top_p=0.5, num_beams=1,
            bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id)
        assert torch.equal(ours(model, tok, enc, do_sample=False), expected)
        torch.manual_seed(0)
        assert torch.equal(ours(model, tok, enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0), sampled)
    finally:
        model.generation_config = saved
    assert model.generation_config is saved  # left as it was


def test_the_checkpoint_config_is_left_alone_even_after_an_error(model_and_batch):
    model, tok, enc = model_and_batch
    saved = model.generation_config
    with pytest.raises(Exception):
        generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=-5, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id, do_sample=False)
    assert model.generation_config is saved


# ---- the next token is drawn by inverting the CDF on CPU (sample_categorical) -----------------------------------

def test_inverse_cdf_sampling_draws_each_token_with_its_probability():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])  # weights need not sum to 1
    torch.manual_seed(0)
    draws = torch.cat([sample_categorical(probs.repeat(1000, 1)).view(1000, 2) for _ in range(40)])  # (40000, 2)
    n = draws.size(0)
    first = torch.bincount(draws[:, 0], minlength=5).double() / n
    expected = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0], dtype=torch.float64)
    se = (expected * (1 - expected) / n).sqrt()
    assert ((first - expected).abs() <= 4 * se).all(), first
    assert first[1] == 0 and first[4] == 0  # zero weights are never drawn
    assert (draws[:, 1] == 4).all()


def test_inverse_cdf_sampling_never_lands_past_the_last_positive_weight(monkeypatch):
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    largest_below_one = torch.tensor(1.0, dtype=torch.float64).nextafter(torch.tensor(0.0, dtype=torch.float64))
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, largest_below_one.item(),
                                                                      dtype=torch.float64))
    assert sample_categorical(probs).item() == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_inverse_cdf_sampling_refuses_what_multinomial_refuses(bad):
    with pytest.raises(RuntimeError, match="probability tensor"):
        sample_categorical(torch.tensor([[0.5, bad, 0.5]]))
    with pytest.raises(RuntimeError, match="probability tensor"):
        sample_categorical(torch.zeros(1, 3))


def test_cpu_generation_samples_through_the_inverse_cdf(model_and_batch, monkeypatch):
    from chatrlhf.training import generation

    model, tok, enc = model_and_batch
    calls = []
    real = generation.sample_categorical
    monkeypatch.setattr(generation, "sample_categorical", lambda probs: calls.append(probs.shape) or real(probs))
    torch.manual_seed(0)
    sampled = ours(model, tok, enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    assert len(calls) == sampled.size(1) - enc["input_ids"].size(1) and calls[0] == (2, model.config.vocab_size)
    torch.manual_seed(0)
    assert torch.equal(ours(model, tok, enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0), sampled)
    assert torch.multinomial.__module__ == "torch"  # put back after the call


def test_the_head_sees_one_contiguous_position_per_row_in_every_forward(model_and_batch):
    # A strided (B, 1, H) slice made PyTorch's CPU matmul copy the head weight once per row (5.5 s and 5.3 GB for
    # 100 rows of SmolLM2); the prefill must hand the head one contiguous position per row, the decoding steps too.
    model, tok, enc = model_and_batch
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda mod, inputs, out: seen.append((tuple(inputs[0].shape), inputs[0].is_contiguous())))
    try:
        out = ours(model, tok, enc, do_sample=False)
    finally:
        handle.remove()
    rows, hidden = enc["input_ids"].size(0), model.config.hidden_size
    assert len(seen) >= 2 and all(s == ((rows, 1, hidden), True) for s in seen), seen
    assert torch.equal(out, plain_greedy(model, tok, enc)[:, :out.size(1)])  # the same tokens as the plain model
