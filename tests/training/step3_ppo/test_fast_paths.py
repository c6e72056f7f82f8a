"""The fast paths ($CHATRLHF_FAST_PATHS, on by default) compute what the plain paths do: fused CPU AdamW, fp32
kernels for bf16 on CPUs without bf16 instructions (attention alone on the others), the head's contiguous input, the scoring forward reused as the
update's first forward, the one-pass entropy metric, the one-collective metric mean, ZeRO-3 models gathered whole
per training forward and, on two ranks, the shared-memory collectives. One PPO step on a tiny model with them on
and off gives the same losses and weight updates (fp32: to float rounding; bf16: within its rounding), on one rank
(ZeRO 0, 2 and 3) and two (ZeRO-2 and 3); and a whole step-3 run in fp32 logs the same metrics."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from chatrlhf.training.hybrid_engine import FAST_PATHS_ENV, Fp32Kernels, fast_paths_enabled
from chatrlhf.training.step3_ppo import core
from chatrlhf.training.step3_ppo.rollout import dropout_free, logprobs_and_entropy
from chatrlhf.utils.models import load_model, load_tokenizer

STEP_SCRIPT = Path(__file__).resolve().parent / "_fast_paths_step.py"
# fp32: the fused and the loop AdamW round differently, nothing else differs. bf16: the fp32 kernels sum in another
# order, so logits differ by bf16 rounding (~1e-2 relative) and so do the gradients.
TOLERANCE = {"fp32": dict(metric=1e-4, update=1e-3, value=1e-5), "bf16": dict(metric=5e-2, update=0.25, value=5e-2)}

pytestmark = pytest.mark.usefixtures("one_thread")


def _step_module():
    spec = importlib.util.spec_from_file_location("_fast_paths_step", STEP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dirs(tiny_model_dir):
    return str(tiny_model_dir("llama")), str(tiny_model_dir("llama", head="score"))


def check(result: dict, dtype: str) -> None:
    tol = TOLERANCE[dtype]
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/policy/entropy", "ppo/policy/ratio"):
        assert result["metrics"][key] < tol["metric"], (key, result)
    assert result["logprobs"] < tol["value"] and result["values"] < tol["value"], result
    for name, update in result["updates"].items():
        assert update["norm"] > 0, (name, result)  # the step did change the weights
        assert update["relative_difference"] < tol["update"], (name, result)
    # Fast: the actor's scoring forward is the update's first (no second one); plain: one each.
    assert tuple(result["actor_forwards"]) in ((1, 2), (2, 3)), result  # (2, 3): LoRA, the reference is the actor


@pytest.mark.parametrize("dtype,zero_stage,lora,checkpointing", [
    ("fp32", 0, False, False), ("bf16", 0, False, False), ("fp32", 2, False, False), ("bf16", 2, False, False),
    ("fp32", 3, False, False), ("bf16", 3, False, False), ("bf16", 2, True, False), ("bf16", 2, True, True)])
def test_one_ppo_step_is_the_same_with_the_fast_paths_off(dirs, dtype, zero_stage, lora, checkpointing, monkeypatch):
    step = _step_module()
    monkeypatch.setenv(FAST_PATHS_ENV, "1")
    runs = {fast: step.one_step(*dirs, dtype=dtype, zero_stage=zero_stage, fast=fast, lora=lora,
                                checkpointing=checkpointing) for fast in (True, False)}
    result = step.compare(runs[True], runs[False])
    check(result, dtype)
    assert runs[True]["metrics"]["ppo/policy/ratio"] == 1.0  # reused: exactly the old log-probs


@pytest.mark.distributed
def test_two_ranks_zero2_and_zero3_one_ppo_step_is_the_same_with_the_fast_paths_off(dirs, tmp_path, deepspeed_launch):
    out = tmp_path / "fast_paths.json"
    deepspeed_launch(str(STEP_SCRIPT), ["--actor", dirs[0], "--critic", dirs[1], "--out", out], timeout=600)
    results = json.loads(out.read_text())
    for dtype in ("fp32", "bf16"):
        check(results[dtype], dtype)
    check(results["zero3_fp32"], "fp32")
    # ZeRO-3 with each training forward gathering the model whole (--zero3_gather_whole) computes what DeepSpeed's
    # layer-by-layer gathers do: the same weights meet the same kernels, to the bit; the gradients are reduced in
    # other groupings, so the updates agree to fp32 rounding (7e-7 measured).
    whole = results["zero3_gather_whole"]
    assert whole["logprobs"] == 0 and whole["values"] == 0, whole
    assert all(v == 0 for v in whole["metrics"].values()), whole
    for name, update in whole["updates"].items():
        assert update["norm"] > 0 and update["relative_difference"] < 1e-5, (name, whole)
    # On: the scoring forwards (whose graph the update reuses) gathered actor and critic whole, their optimizer
    # steps partitioned them again. Off: never gathered whole.
    assert whole["gathered_whole"] == {"True": [[True, True], [False, False]], "False": [[False, False], [False, False]]}


def test_fast_paths_switch(monkeypatch):
    monkeypatch.delenv(FAST_PATHS_ENV, raising=False)
    assert fast_paths_enabled()
    for off in ("0", "false", "off"):
        monkeypatch.setenv(FAST_PATHS_ENV, off)
        assert not fast_paths_enabled()


@pytest.mark.parametrize("linear", [True, False], ids=["linear_and_attention", "attention_only"])
def test_fp32_kernels_match_bf16_kernels_forward_and_backward(tiny_model_dir, linear):
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.bfloat16, dropout=0.0)
    ids = torch.randint(3, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for mode in (None, Fp32Kernels):
        model.zero_grad(set_to_none=True)
        if mode is None:
            logits = model(input_ids=ids).logits
        else:
            with mode(linear=linear):
                logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        logits.float().square().mean().backward()
        results.append((logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
    for name in ga:
        assert (ga[name] - gb[name]).norm() <= 5e-2 * ga[name].norm() + 1e-6, name
        assert gb[name].dtype == torch.float32 and dict(model.named_parameters())[name].dtype == torch.bfloat16


def test_native_bf16_cpus_take_fp32_attention_for_many_tokens_and_bf16_for_decoding(tiny_model_dir, monkeypatch):
    """Where the CPU multiplies bf16 natively, linear layers stay on bf16 kernels and only attention runs in fp32,
    except in decoding steps (one query position: upcasting the KV cache costs what the attention does)."""
    import torch.nn.functional as F

    from chatrlhf.training import hybrid_engine

    monkeypatch.setattr(hybrid_engine, "native_bf16_matmul", lambda: True)
    linear_calls, attention = [], []
    apply = hybrid_engine._Fp32Linear.apply
    monkeypatch.setattr(hybrid_engine._Fp32Linear, "apply", lambda *a: linear_calls.append(1) or apply(*a))

    class Spy(torch.overrides.TorchFunctionMode):  # entered first, so it sees what Fp32Kernels passes on
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                attention.append((args[0].dtype, args[0].size(-2)))
            return func(*args, **(kwargs or {}))
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.bfloat16, dropout=0.0)
    engine = hybrid_engine.build_engine(model, zero_stage=0, dtype="bf16", micro_batch_size=2, learning_rate=1e-2,
                                        total_steps=1, fast=True)
    ids = torch.randint(3, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
    with Spy():
        loss = engine(input_ids=ids, labels=ids).loss
    assert not linear_calls and set(attention) == {(torch.float32, 32)}
    engine.backward(loss)
    engine.step()
    attention.clear()
    with torch.no_grad(), Spy():  # a prefill of 2 x 32 tokens, then one decoding step of 40 rows (>= 32 tokens)
        out = engine.module(input_ids=ids, use_cache=True)
        rows = torch.randint(3, len(tok), (40, 1))
        cache = engine.module(input_ids=rows.repeat(1, 32), use_cache=True).past_key_values
        engine.module(input_ids=rows, past_key_values=cache, use_cache=True)
    assert out.logits.dtype == torch.bfloat16
    assert {a[0] for a in attention if a[1] > 1} == {torch.float32}
    assert {a[0] for a in attention if a[1] == 1} == {torch.bfloat16}


def test_zero3_linear_layers_take_the_fp32_kernels(tiny_model_dir, monkeypatch):
    """ZeRO-3 leaves torch's F.linear in place: DeepSpeed's memory_efficient_linear would swap it, process-wide, for
    an autograd function whose bf16 matmuls the fp32-kernel mode never sees (ZeRO-3's PPO step ran at 0.48x
    ZeRO-2's). A ZeRO-3 bf16 forward goes through the fp32 kernels as ZeRO-2's does, and trains."""
    import torch.nn.functional as F

    from chatrlhf.training import hybrid_engine

    monkeypatch.setattr(hybrid_engine, "native_bf16_matmul", lambda: False)  # the fast path, on any CPU
    calls = []
    apply = hybrid_engine._Fp32Linear.apply
    monkeypatch.setattr(hybrid_engine._Fp32Linear, "apply", lambda *a: calls.append(1) or apply(*a))
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    model = load_model(str(tiny_model_dir("llama")), tok, dtype=torch.bfloat16, dropout=0.0)
    engine = hybrid_engine.build_engine(model, zero_stage=3, dtype="bf16", micro_batch_size=2, learning_rate=1e-2,
                                        total_steps=1, fast=True)
    assert F.linear is torch._C._nn.linear  # not deepspeed.runtime.zero.linear.zero3_linear_wrap
    ids = torch.randint(3, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
    loss = engine(input_ids=ids, labels=ids).loss
    assert calls, "the ZeRO-3 forward did not run the fp32 kernels"
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        assert engine(input_ids=ids, labels=ids).loss < loss.detach()


def test_one_pass_logprobs_and_entropy_are_the_core_functions():
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    logprobs, entropy = logprobs_and_entropy(logits, tokens, 0.7)
    assert torch.equal(logprobs, core.logprobs_from_logits(logits, tokens, 0.7))
    assert torch.allclose(entropy, core.entropy_from_logits(logits, 0.7), atol=1e-6)
    assert logprobs.requires_grad and not entropy.requires_grad


def test_dropout_free(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    assert dropout_free(load_model(str(tiny_model_dir("llama")), tok, dropout=0.0))
    assert not dropout_free(load_model(str(tiny_model_dir("llama")), tok, dropout=0.1))  # llama: functional dropout
    assert not dropout_free(load_model(str(tiny_model_dir("gpt2")), tok, dropout=0.1))  # nn.Dropout modules


def _run_flags(actor, out, data, cache) -> dict:
    return dict(actor_model_name_or_path=str(actor), critic_model_name_or_path=str(actor), data_path=[str(data)],
                data_split="0,0,1", eval_fraction=0.25, dtype="fp32", output_dir=str(out), data_output_path=str(cache),
                max_prompt_seq_len=16, max_answer_seq_len=6, per_device_generation_batch_size=4,
                per_device_training_batch_size=4, ppo_epochs=1, actor_learning_rate=1e-3, critic_learning_rate=1e-3,
                lr_scheduler_type="constant", max_steps=1, eval_iters=1, per_device_eval_batch_size=1, seed=5,
                resume=False)


def test_a_step3_run_logs_the_same_metrics_with_the_fast_paths_off(tiny_model_dir, tmp_path, monkeypatch):
    from chatrlhf.training.step3_ppo.config import PPOConfig
    from chatrlhf.training.step3_ppo.main import run
    from chatrlhf.utils.config import from_flat
    from chatrlhf.utils.logging import read_metrics

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i} about the cat?", "chosen": "yes", "rejected": "no"})
                            + "\n" for i in range(16)))
    logged = {}
    for fast in ("1", "0"):
        monkeypatch.setenv(FAST_PATHS_ENV, fast)
        out = tmp_path / f"run{fast}"
        run(from_flat(PPOConfig, _run_flags(tiny_model_dir("llama"), out, data, tmp_path / "cache")))
        logged[fast] = next(m for m in read_metrics(out) if "ppo/loss/policy" in m)
    for key, slow in logged["0"].items():
        if key.startswith(("ppo/", "objective/")):
            assert logged["1"][key] == pytest.approx(slow, rel=1e-4, abs=1e-6), key
