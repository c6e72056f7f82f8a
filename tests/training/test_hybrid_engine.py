"""The hybrid engine's contract (training/hybrid_engine.py): greedy output through `generation()` equals plain
`generate` on the same weights (ZeRO 0 and 3, with and without LoRA, gathered or not, one rank and two), leaving
generation mode restores everything (also after an exception), and training calls are refused where they must be."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from chatrlhf.training.hybrid_engine import build_engine
from chatrlhf.utils.models import add_lora, load_model, load_tokenizer

TWO_RANKS_SCRIPT = Path(__file__).resolve().parent / "_he_two_ranks.py"
PROMPTS = ["hello there", "The quick brown fox jumps", "how can I help?"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama with weights re-drawn at std 0.3: its greedy answers vary from token to token (the
    0.02-std initialisation repeats one token), so a wrong cache, mask or position shows up in the output."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("diverse-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir("llama")).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def zero3_config(tmp_path_factory) -> str:
    """Every parameter partitioned: by default ZeRO-3 keeps tensors under 1e4 elements whole on each rank, which
    is all of the tiny model but its embedding."""
    path = tmp_path_factory.mktemp("ds") / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return str(path)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(str(model_dir), padding_side="left")


def make(model_dir, zero_stage: int, zero3_config: str, *, lora: bool = False, gradient_checkpointing: bool = False,
         trainable: bool = True, gather_whole: bool = False):
    """(engine, plain copy of the same weights) for one model."""
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tok, gradient_checkpointing=gradient_checkpointing)
    if lora:
        # peft's start: these fixtures' answers (rows ending at different lengths) were chosen with it.
        model = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=False, init="peft")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero, where LoRA would change nothing
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    plain = copy.deepcopy(model).eval()
    engine = build_engine(model, zero_stage=zero_stage, dtype="fp32", micro_batch_size=2, learning_rate=1e-2,
                          trainable=trainable, user_config_path=zero3_config if zero_stage == 3 else None,
                          gather_whole=gather_whole)
    return engine, plain


def greedy(model, tok, enc, max_new_tokens: int, eos: int) -> torch.Tensor:
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=eos)
    with torch.no_grad():
        return model.generate(**enc, generation_config=config)


def full_weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.full_state_dict().items()}


def train_step(engine, tok) -> torch.Tensor:
    engine.train()
    batch = tok(["a short training text", "and another"], return_tensors="pt", padding=True)
    loss = engine(**batch, labels=batch["input_ids"]).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


@pytest.mark.parametrize("zero_stage,lora", [(0, False), (0, True), (3, False), (3, True)],
                         ids=["zero0", "zero0-lora", "zero3", "zero3-lora"])
def test_greedy_generation_equals_plain_generate_and_leaves_weights_bit_identical(model_dir, zero3_config, tok,
                                                                                   zero_stage, lora):
    engine, plain = make(model_dir, zero_stage, zero3_config, lora=lora)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    P = enc["input_ids"].size(1)
    # An EOS that the first prompt's answer reaches after a few tokens: rows end at different lengths.
    eos = int(greedy(plain, tok, enc, 12, tok.eos_token_id)[0, P + 2])
    expected = greedy(plain, tok, enc, 12, eos)
    ends = [(row == eos).nonzero()[:1].flatten().tolist() for row in expected[:, P:]]
    assert ends[0] and ends[0][0] <= 2 and not all(ends), ends
    if lora:  # the adapters matter: without them the answers differ
        with plain.disable_adapter():
            assert not torch.equal(greedy(plain, tok, enc, 12, eos), expected)
    before = full_weights(engine)
    # All at once; a layer at a time (--unpin_actor_parameters); plain ZeRO-3 per-module fetching.
    for mode in (dict(gather=True), dict(gather=True, layers_per_gather=1), dict(gather=False)):
        with engine.generation(**mode) as gen:
            out = gen(enc["input_ids"], enc["attention_mask"], max_new_tokens=12, pad_token_id=tok.pad_token_id,
                      eos_token_id=eos, do_sample=False)
        assert torch.equal(out, expected), (mode, out[:, P:], expected[:, P:])
        after = full_weights(engine)  # the LoRA merge was undone exactly, not by subtraction
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_inside_generation_mode(model_dir, zero3_config, tok):
    """Entering: eval mode, checkpointing off, ZeRO-3 parameters whole with the fetch hooks off, LoRA merged."""
    engine, plain = make(model_dir, 3, zero3_config, lora=True, gradient_checkpointing=True)
    module, offload = engine.module, engine.engine.optimizer.parameter_offload
    hooks = len(offload.forward_hooks)
    params = list(module.parameters())
    assert hooks > 0 and module.training and module.is_gradient_checkpointing
    assert all(p.numel() == 0 for p in params)  # partitioned
    q_proj = module.get_base_model().model.layers[0].self_attn.q_proj
    plain_q = plain.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        merged = plain_q.base_layer.weight + plain_q.get_delta_weight("default")
    with engine.generation() as gen:
        assert engine.mode == "generate" and not module.training and not module.is_gradient_checkpointing
        assert all(p.shape == p.ds_shape for p in params) and offload.forward_hooks == []
        torch.testing.assert_close(q_proj.base_layer.weight, merged)
        attn = module.get_base_model().model.layers[0].self_attn
        assert attn.q_proj is q_proj.base_layer  # the merged plain layer in the LoRA wrapper's place
        gen(*tok(PROMPTS[:1], return_tensors="pt").values(), max_new_tokens=2, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, do_sample=False)
    assert engine.mode == "train" and module.training and module.is_gradient_checkpointing
    assert attn.q_proj is q_proj  # the wrapper is back
    assert all(p.numel() == 0 for p in params) and len(offload.forward_hooks) == hooks


def test_layer_groups_bound_what_is_gathered(model_dir, zero3_config, tok):
    """--unpin_actor_parameters: while a decoder layer runs, only its group is whole; the rest of the model (embeddings,
    final norm, head) stays gathered; nothing is left gathered afterwards and the fetch hooks are back."""
    from chatrlhf.utils.models import decoder_layers

    engine, _ = make(model_dir, 3, zero3_config, lora=True)
    module, offload = engine.module, engine.engine.optimizer.parameter_offload
    hooks = len(offload.forward_hooks)
    _, layers = decoder_layers(module)
    assert len(layers) == 2 and layers is module.get_base_model().model.layers
    whole = [[] for _ in layers]  # per layer forward: which layers were whole while it ran

    def probe(i):
        def hook(layer, args):
            whole[i].append([all(p.shape == p.ds_shape for p in other.parameters()) for other in layers])
        return hook

    probes = [layer.self_attn.register_forward_pre_hook(probe(i)) for i, layer in enumerate(layers)]
    with engine.generation(layers_per_gather=1) as gen:
        head = module.get_base_model().lm_head.weight
        assert head.shape == head.ds_shape and offload.forward_hooks == []
        assert not any(p.shape == p.ds_shape for p in layers.parameters())  # between forwards: all released
        gen(*tok(PROMPTS[:1], return_tensors="pt").values(), max_new_tokens=3, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, do_sample=False)
    for probe_handle in probes:
        probe_handle.remove()
    assert whole[0] and all(w == [True, False] for w in whole[0]), whole[0]
    assert whole[1] and all(w == [False, True] for w in whole[1]), whole[1]
    assert all(p.numel() == 0 for p in module.parameters()) and len(offload.forward_hooks) == hooks
    with pytest.raises(ValueError, match="layers_per_gather"):
        with engine.generation(layers_per_gather=-1):
            pass


def test_zero3_gather_whole_holds_a_training_forward_through_its_backward(model_dir, zero3_config, tok):
    """--zero3_gather_whole: a training forward gathers the model whole with DeepSpeed's fetch hooks off, its
    backward gathers nothing, the optimizer step partitions it again; generation releases it first. The engine
    trains exactly as the layer-by-layer one does."""
    engine, _ = make(model_dir, 3, zero3_config, gather_whole=True)
    module, offload = engine.module, engine.engine.optimizer.parameter_offload
    hooks, params = len(offload.forward_hooks), list(engine.module.parameters())
    batch = tok(["a short training text", "and another"], return_tensors="pt", padding=True)
    engine.train()
    with torch.no_grad():  # no graph, no backward to hold for: DeepSpeed's own fetching
        engine(**batch)
    assert all(p.numel() == 0 for p in params) and len(offload.forward_hooks) == hooks
    loss = engine(**batch, labels=batch["input_ids"]).loss
    assert all(p.shape == p.ds_shape for p in params) and offload.forward_hooks == []
    engine.backward(loss)
    assert all(p.shape == p.ds_shape for p in params)
    engine.step()
    assert all(p.numel() == 0 for p in params) and len(offload.forward_hooks) == hooks
    engine(**batch, labels=batch["input_ids"])  # held again, then generation takes over and gives it back
    with engine.generation() as gen:
        gen(*tok(PROMPTS[:1], return_tensors="pt").values(), max_new_tokens=2, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, do_sample=False)
    assert all(p.numel() == 0 for p in params) and len(offload.forward_hooks) == hooks
    assert module.training
    # The same training as DeepSpeed's layer-by-layer gathers, loss for loss and weight for weight (to fp32
    # rounding: the gradient norm for clipping is summed in other groupings, and Adam magnifies it where v is tiny).
    runs = {}
    for whole in (True, False):
        e, _ = make(model_dir, 3, zero3_config, gather_whole=whole)
        runs[whole] = ([train_step(e, tok) for _ in range(3)], full_weights(e))
    (losses, weights), (plain_losses, plain_weights) = runs[True], runs[False]
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.stack(losses), torch.stack(plain_losses), rtol=1e-6, atol=0)
    for k in plain_weights:
        torch.testing.assert_close(weights[k], plain_weights[k], rtol=1e-4, atol=2e-6)


def test_mode_restored_after_an_exception_and_training_works(model_dir, zero3_config, tok):
    engine, _ = make(model_dir, 3, zero3_config, lora=True, gradient_checkpointing=True)
    module, offload = engine.module, engine.engine.optimizer.parameter_offload
    hooks = len(offload.forward_hooks)
    before = full_weights(engine)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with engine.generation() as gen:
            gen(*tok(PROMPTS[:2], return_tensors="pt", padding=True).values(), max_new_tokens=3,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, do_sample=False)
            raise Boom
    assert engine.mode == "train" and module.training and module.is_gradient_checkpointing
    assert len(offload.forward_hooks) == hooks and all(p.numel() == 0 for p in module.parameters())
    after = full_weights(engine)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the LoRA merge was undone
    # Training works: ZeRO-3 fetches parameters again, gradients flow, the optimizer moves the weights.
    losses = [train_step(engine, tok) for _ in range(3)]
    assert all(torch.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    trained = full_weights(engine)
    assert any(not torch.equal(trained[k], before[k]) for k in before)

    # An engine that was in eval mode goes back to eval mode.
    engine.eval()
    with pytest.raises(Boom):
        with engine.generation():
            raise Boom
    assert engine.mode == "train" and not module.training


def test_training_calls_and_nesting_are_refused_in_generation_mode(model_dir, zero3_config, tok):
    engine, _ = make(model_dir, 0, zero3_config)
    batch = tok(["a short training text"], return_tensors="pt")
    loss = engine(**batch, labels=batch["input_ids"]).loss
    with engine.generation():
        with pytest.raises(RuntimeError, match="backward.*generation mode"):
            engine.backward(loss)
        with pytest.raises(RuntimeError, match="step.*generation mode"):
            engine.step()
        with pytest.raises(RuntimeError, match="train.*generation mode"):
            engine.train()
        with pytest.raises(RuntimeError, match="already in generation mode"):
            with engine.generation():
                pass
        assert engine.mode == "generate"  # the refused nested entry did not leave generation mode
    engine.backward(loss)  # allowed again outside
    engine.step()


def test_a_frozen_engine_refuses_backward_and_step(model_dir, zero3_config, tok):
    engine, plain = make(model_dir, 0, zero3_config, trainable=False)
    assert not engine.module.training and not any(p.requires_grad for p in engine.module.parameters())
    batch = tok(["a short text"], return_tensors="pt")
    loss = plain(**batch, labels=batch["input_ids"]).loss
    with pytest.raises(RuntimeError, match="backward.*frozen"):
        engine.backward(loss)
    with pytest.raises(RuntimeError, match="step.*frozen"):
        engine.step()
    with engine.generation() as gen:  # it can still generate
        gen(batch["input_ids"], batch["attention_mask"], max_new_tokens=2, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, do_sample=False)


@pytest.mark.distributed
def test_two_ranks_zero3_match_plain_generate_when_ranks_finish_at_different_lengths(model_dir, zero3_config,
                                                                                     tmp_path, deepspeed_launch):
    deepspeed_launch(str(TWO_RANKS_SCRIPT), ["--model", model_dir, "--out", tmp_path, "--zero_config", zero3_config],
                     timeout=300)  # a hang fails here
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == {f"lora={lora},gather={g}" for lora in (0, 1) for g in ("0", "1", "layers")}
    for case in ranks[0]:
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["equal"] and r1["equal"], (case, r0, r1)
        # Different prompts, batch sizes, limits and EOS rows: the ranks left generate at different lengths.
        assert max(r0["response_lengths"]) == 5 and max(r1["response_lengths"]) == 14, case
        assert min(r0["response_lengths"]) < 5 and min(r1["response_lengths"]) < 14, case
        assert r0["training"] and r1["training"] and r0["loss"] == pytest.approx(r1["loss"])
    # LoRA changes the answers (its B matrices are not zero here).
    assert ranks[1]["lora=1,gather=1"]["hybrid"] != ranks[1]["lora=0,gather=1"]["hybrid"]


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
@pytest.mark.parametrize("head", ["causal_lm", "score"])
def test_bf16_lora_engine_trains_under_every_zero_stage(model_dir, zero3_config, tok, zero_stage, head):
    """bf16 base weights with LoRA adapters (peft would make the adapters fp32; ZeRO-3 needs one dtype among the
    trained tensors, and DeepSpeed keeps fp32 master copies anyway)."""
    torch.manual_seed(0)  # the fresh score head
    model = load_model(str(model_dir), tok, head=head, dtype=torch.bfloat16)
    model = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=True, head=head)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trained == {torch.bfloat16}
    lr = 1e-2 if head == "causal_lm" else 1e-3  # the trained score head would overshoot its target at 1e-2
    engine = build_engine(model, zero_stage=zero_stage, dtype="bf16", micro_batch_size=2, learning_rate=lr,
                          lora_learning_rate=lr, user_config_path=zero3_config if zero_stage == 3 else None)
    batch = tok(["a short training text", "and another"], return_tensors="pt", padding=True)
    engine.train()
    losses = []
    for _ in range(3):
        out = engine(**batch, **({"labels": batch["input_ids"]} if head == "causal_lm" else {}))
        loss = out.loss if head == "causal_lm" else out.logits.float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
