"""Generation's prepacked bf16 linear layers (training/prepacked_linear.py): the same numbers bit for bit, only
where nothing needs a graph, the layers' own forwards back afterwards, and a no-op where it does not apply."""
from __future__ import annotations

import pytest
import torch

from chatrlhf.training import precision, prepacked_linear
from chatrlhf.training.generation import generate
from chatrlhf.training.prepacked_linear import prepacked_linears
from chatrlhf.utils.models import load_model, load_tokenizer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (precision.native_bf16_matmul() and torch.backends.mkldnn.is_available()),
                                 reason="prepacking applies to CPUs with bf16 instructions only")]


@pytest.fixture
def model_and_batch(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    tok = load_tokenizer(path, padding_side="left")
    model = load_model(path, tok, head="causal_lm").to(torch.bfloat16).eval()
    enc = tok(["hello there", "The quick brown fox jumps"], return_tensors="pt", padding=True)
    return model, tok, enc


@pytest.fixture
def packed_calls(monkeypatch):
    """How many linear forwards ran on packed weights."""
    calls = []
    real = prepacked_linear.packed_linear

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(prepacked_linear, "packed_linear", counting)
    return calls


def sample(model, tok, enc):
    torch.manual_seed(0)
    return generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12, pad_token_id=tok.pad_token_id,
                    eos_token_id=None, do_sample=True)


def test_generation_on_packed_weights_samples_the_same_tokens(model_and_batch, packed_calls, monkeypatch):
    model, tok, enc = model_and_batch
    packed = sample(model, tok, enc)
    layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(packed_calls) >= 12 * layers  # the prefill and every decoding step, every layer (head included)
    monkeypatch.setenv(precision.FAST_PATHS_ENV, "0")
    del packed_calls[:]
    assert torch.equal(sample(model, tok, enc), packed)
    assert not packed_calls
    assert not any("forward" in vars(m) for m in model.modules())  # the layers' own forwards are back


@pytest.mark.parametrize("rows", [1, 4, 37, 480])
def test_a_packed_layer_gives_f_linear_bit_for_bit(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, 2, 96, dtype=torch.bfloat16)[:, 0]  # a strided input, too
    expected = layer(x)
    with prepacked_linears(layer):
        assert "forward" in vars(layer)
        assert torch.equal(layer(x), expected)
    assert "forward" not in vars(layer)


def test_forwards_that_need_a_graph_run_the_layer_itself(packed_calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    layer(x).float().square().sum().backward()
    expected = layer.weight.grad.clone()
    layer.weight.grad = None
    with prepacked_linears(layer):
        layer(x).float().square().sum().backward()
        assert not packed_calls
        with torch.no_grad():
            layer(x)
        assert len(packed_calls) == 1
    assert torch.equal(layer.weight.grad, expected)


def test_the_layers_come_back_after_an_error_and_a_nested_call_packs_nothing(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    packs = []
    real = prepacked_linear.pack
    monkeypatch.setattr(prepacked_linear, "pack", lambda w: packs.append(1) or real(w))
    with pytest.raises(KeyError), prepacked_linears(model):
        with prepacked_linears(model):
            pass
        raise KeyError("boom")
    assert len(packs) == 2  # once per layer, not again inside
    assert not any("forward" in vars(m) for m in model.modules())
    assert not hasattr(model, prepacked_linear._PACKED)


@pytest.mark.parametrize("case", ["no bf16 instructions", "fast paths off", "fp32 weights", "not enough RAM",
                                  "zero-3 placeholder"])
def test_nothing_is_packed_where_it_does_not_apply(case, monkeypatch):
    layer = torch.nn.Linear(8, 8).to(torch.bfloat16)
    if case == "no bf16 instructions":
        monkeypatch.setattr(precision, "native_bf16_matmul", lambda: False)
    elif case == "fast paths off":
        monkeypatch.setenv(precision.FAST_PATHS_ENV, "0")
    elif case == "fp32 weights":
        layer = layer.float()
    elif case == "not enough RAM":
        from chatrlhf.training import memory_plan

        monkeypatch.setattr(memory_plan, "host_memory_available", lambda: 200.0)  # 128 bytes of copies > half
    else:
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16))  # what ZeRO-3 leaves between gathers
    with prepacked_linears(layer):
        assert "forward" not in vars(layer)
