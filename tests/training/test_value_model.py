"""Per-token values and the end-score rule: left/right padding, truncation, pad == eos, HF pooling, peft, ZeRO-free."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from chatrlhf.training.data.collate import pad
from chatrlhf.training.data.render import encode_prompt, encode_response
from chatrlhf.training.value_model import end_scores, last_token_index, position_ids, token_values, unwrap
from chatrlhf.utils.models import add_lora, load_model, load_tokenizer


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_end_scores_reads_the_last_real_token():
    values = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert end_scores(values, right).tolist() == [2.0, 9.0, 11.0]
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert end_scores(values, left).tolist() == [4.0, 9.0, 14.0]


def test_truncated_sequence_scores_its_last_kept_token():
    # A row cut at max_seq_len has no padding and no eos: its score is at the last position.
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert end_scores(values, mask).tolist() == pytest.approx([0.4, 0.6])


def test_pad_equal_to_eos_is_decided_by_the_mask_not_the_ids():
    eos = 7  # a tokenizer whose pad id is its eos id (DeepSpeed-Chat's OPT/GPT-2 setup)
    ids = torch.tensor([[5, 6, eos, eos, eos],   # answer + eos, then two pads that are also `eos`
                        [eos, eos, 5, 6, eos]])  # left-padded the same way
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]])
    # The trained eos (index 2 / 4) is the score, not the first or last id equal to eos.
    assert end_scores(values, mask).tolist() == [3.0, 10.0]
    assert (ids[0] == eos).nonzero()[0].item() == 2 and end_scores(values[:1], mask[:1]).item() == 3.0


def test_position_ids_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_empty_rows_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="all zeros"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="differ in shape"):
        end_scores(torch.zeros(2, 3), torch.ones(2, 4))


FAMILIES = ["llama", "qwen2", "opt", "gpt2", "gpt_neox", "bloom"]


@pytest.fixture(params=FAMILIES)
def reward_model(request, tiny_model_dir):
    path = str(tiny_model_dir(request.param, chat_template=request.param != "opt"))
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = load_model(path, tok, head="score").eval()
    return model, tok


def _pairs(tok, side="right"):
    prompt = encode_prompt(tok, [{"role": "user", "content": "How do I bake bread?"}])
    answers = ("Mix flour and water.", "No.", "Knead it, rest it, bake it well.")
    rows = [prompt + encode_response(tok, a) for a in answers]
    return pad(rows, tok.pad_token_id, side)


def test_end_scores_equal_hf_pooled_logits_on_right_padding(reward_model):
    model, tok = reward_model
    assert tok.pad_token_id != tok.eos_token_id
    ids, mask = _pairs(tok)
    with torch.no_grad():
        ours = end_scores(token_values(model, ids, mask), mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    # The same positions; token_values' forward is padding-free (training/packing.py), so equal to fp32 rounding.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_left_padding_gives_the_same_scores_as_right_padding(reward_model):
    model, tok = reward_model
    ids_r, mask_r = _pairs(tok, "right")
    ids_l, mask_l = _pairs(tok, "left")
    assert not torch.equal(mask_l, mask_r)
    with torch.no_grad():
        right = end_scores(token_values(model, ids_r, mask_r), mask_r)
        left = end_scores(token_values(model, ids_l, mask_l), mask_l)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


def test_values_depend_only_on_the_prefix(reward_model):
    """A causal model's value at t sees tokens <= t: padding after the end never changes the score."""
    model, tok = reward_model
    ids, mask = _pairs(tok)
    with torch.no_grad():
        short = end_scores(token_values(model, ids, mask), mask)
        wider_ids = torch.cat([ids, torch.full((3, 4), tok.pad_token_id)], 1)
        wider_mask = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], 1)
        wider = end_scores(token_values(model, wider_ids, wider_mask), wider_mask)
    torch.testing.assert_close(short, wider, rtol=1e-5, atol=1e-5)


def test_works_through_peft_and_passes_gradients(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    tok = load_tokenizer(path)
    model = add_lora(load_model(path, tok, head="score"), dim=4, alpha=None, dropout=0.0, module_name=None,
                     only_optimize_lora=True, head="score")
    assert unwrap(model) is model.get_base_model()
    ids, mask = _pairs(tok)
    values = token_values(model, ids, mask)
    assert values.shape == ids.shape
    end_scores(values, mask).sum().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("modules_to_save" in n and "score" in n for n in trained), trained


def test_a_causal_lm_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with pytest.raises(TypeError, match="score"):
        token_values(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


def test_a_multi_label_head_is_refused(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("llama"), num_labels=2)
    model.config.pad_token_id = 0
    with pytest.raises(ValueError, match="num_labels=1"):
        token_values(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


def test_zero3_engine_and_its_module_give_the_plain_scores(tiny_model_dir):
    """Under ZeRO-3 the parameters live in shards; calling the whole model lets DeepSpeed gather them."""
    from chatrlhf.training.builders import build_trained_model
    from chatrlhf.training.config import EngineArgs, ModelArgs, OptimArgs

    path = str(tiny_model_dir("llama"))
    tok = load_tokenizer(path)
    engine = build_trained_model(ModelArgs(model_name_or_path=path, zero_stage=3), OptimArgs(), EngineArgs(dtype="fp32"), tok,
                                 head="score", micro_batch_size=3, total_steps=1)
    ids, mask = _pairs(tok)
    with torch.no_grad():
        via_engine = end_scores(token_values(engine, ids, mask), mask)
        via_module = end_scores(token_values(engine.module, ids, mask), mask)
        pooled = engine.module(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(via_engine, via_module, rtol=0, atol=0)
    torch.testing.assert_close(via_engine, pooled, rtol=1e-6, atol=1e-6)
    engine.backward(end_scores(token_values(engine, ids, mask), mask).sum())  # gradients reach the sharded head
    engine.step()
    with torch.no_grad():
        assert not torch.equal(end_scores(token_values(engine, ids, mask), mask), via_engine)


def test_checkpointing_is_read_through_wrappers_without_the_deprecated_property(tiny_model_dir):
    import warnings

    from chatrlhf.training.value_model import checkpointing

    def on(model) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # transformers 5's is_gradient_checkpointing warns
            return checkpointing(model)

    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok)
    assert not on(model)
    model.gradient_checkpointing_enable()
    assert on(model)
    peft = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=True, head="causal_lm")
    assert on(peft)
    model.gradient_checkpointing_disable()
    assert not on(peft)
