import copy

import pytest

from chatrlhf.training.data.render import encode_prompt, encode_response, render_prompt, render_response

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "how are you?"}]


def test_render_prompt_with_chat_template(tokenizer):
    assert render_prompt(tokenizer, MSGS) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
        "<|im_start|>assistant\nhi!<|im_end|>\n<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n")
    assert render_response(tokenizer, "fine") == "fine"


def test_render_prompt_without_chat_template_is_deepspeed_chat_form(plain_tokenizer):
    assert render_prompt(plain_tokenizer, MSGS) == (
        "Be brief.\n\nHuman: hello there\n\nAssistant: hi!\n\nHuman: how are you?\n\nAssistant:")
    assert render_prompt(plain_tokenizer, MSGS[1:2]) == "\n\nHuman: hello there\n\nAssistant:"
    assert render_response(plain_tokenizer, "fine") == " fine"


def test_encode_prompt_adds_no_special_tokens_to_a_template(tokenizer):
    text = render_prompt(tokenizer, MSGS)
    assert encode_prompt(tokenizer, MSGS) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_encode_prompt_keeps_the_tokenizers_bos_without_template(plain_tokenizer):
    from tokenizers import processors

    tok = copy.deepcopy(plain_tokenizer)  # a Llama-like tokenizer that adds BOS
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    ids = encode_prompt(tok, MSGS[1:2])
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == plain_tokenizer("\n\nHuman: hello there\n\nAssistant:", add_special_tokens=False)["input_ids"]
    response = encode_response(tok, "fine")
    assert tok.bos_token_id not in response  # responses never get BOS


@pytest.mark.parametrize("fixture", ["tokenizer", "plain_tokenizer"])
def test_encode_response_ends_with_one_eos(request, fixture):
    tok = request.getfixturevalue(fixture)
    ids = encode_response(tok, "Sure, here it is.")
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    assert ids[:-1] == tok(render_response(tok, "Sure, here it is."), add_special_tokens=False)["input_ids"]


def test_encode_response_needs_an_eos(plain_tokenizer):
    tok = copy.deepcopy(plain_tokenizer)
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        encode_response(tok, "x")
