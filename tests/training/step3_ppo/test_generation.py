"""The one generation call (chatrlhf.training.generation.generate) samples exactly the distribution whose
log-probabilities PPO computes: a checkpoint's generation_config cannot change it."""
from __future__ import annotations

import pytest
import torch

from chatrlhf.training.generation import generate
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
