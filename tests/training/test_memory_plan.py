"""The memory plan: its arithmetic on hand-computed numbers, the refusal with the cheapest changes that fit, and the
plan each step prints before it builds its engines."""
from __future__ import annotations

import pytest

from chatrlhf.training import memory_plan as mp

GB = mp.GB
# A toy LLaMA: V 1000, h 64, 2 layers, 4 heads of 16 (2 key/value heads), MLP 128, tied embeddings.
SHAPE = mp.Shape(vocab=1000, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128)
# One block's Linear weights: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up 64x128 + down 128x64
BLOCK = 4096 + 2048 + 2048 + 4096 + 3 * 8192  # 36864
N = 1000 * 64 + 2 * (BLOCK + 2 * 64) + 64     # embeddings + 2 blocks (+ 2 norms each) + final norm = 138048
RUNTIME = mp.RUNTIME_BYTES["cpu"]
NORMS = 2 * 64 * 4  # a LLaMA block's two RMSNorm inputs, saved in fp32 whatever the dtype: bytes a token and layer


def test_parameter_counts():
    assert SHAPE.num_params() == N == 138048
    assert SHAPE.num_params("score") == N + 64  # a scalar head instead of the tied LM head
    assert SHAPE.lora_params(8) == 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192) == 16384
    assert SHAPE.wrapped_weights() == 2 * BLOCK
    assert SHAPE.activation_values() == 6 * 64 + 2 * 32 + 4 * 128 == 960
    assert SHAPE.activation_fp32_bytes() == NORMS == 512
    assert mp.trainable_params(mp.Trained(SHAPE, lora_dim=8, only_optimize_lora=True)) == 16384
    # Without --only_optimize_lora the wrapped weights freeze and the rest (embeddings, norms) trains.
    assert mp.trainable_params(mp.Trained(SHAPE, lora_dim=8)) == N - 2 * BLOCK + 16384


def test_config_shapes_count_like_the_model(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    for family in ("llama", "qwen2"):
        path = tiny_model_dir(family)
        shape = mp.shape_from_config(AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path)
        exact = sum(p.numel() for p in model.parameters())
        assert abs(shape.num_params() - exact) <= 0.02 * exact, family  # biases (qwen2's q/k/v) left out
        assert mp.shape_of(str(path)).num_params() == exact  # counted on the meta device


def test_zero0_fp32_plan_by_hand():
    m = mp.Trained(SHAPE)
    plan = mp.supervised_plan(m, dtype="fp32", world=1, batch=2, seq=10, on_cpu=True)
    rows = {r.name: r.device for r in plan.rows}
    assert rows["model parameters"] == rows["model gradients"] == 4 * N
    assert rows["model optimizer"] == 8 * N  # Adam's m and v; a torch optimizer keeps no fp32 master in fp32
    assert rows["model optimizer step"] == 4 * N  # torch AdamW's temporary, which the CPU keeps
    act = 20 * (960 * 4 + NORMS) * 2 + 2 * 10 * 1000 * (4 + 3 * 4)  # blocks + logits with the fp32 log-softmax
    assert list(plan.phases.values()) == [act] == [494080]
    assert plan.device_peak == 20 * N + RUNTIME + act
    gpu = mp.supervised_plan(m, dtype="fp32", world=1, batch=2, seq=10, on_cpu=False)
    assert gpu.device_peak == 16 * N + mp.RUNTIME_BYTES["gpu"] + act  # FusedAdam: no temporaries
    # On the CPU, LoRA's unmerged adapters leave one output per wrapped Linear (64+32+32+64+128+128+64 values).
    lora = mp.Trained(SHAPE, lora_dim=8, only_optimize_lora=True)
    assert mp.activations(lora, "fp32", 2, 10, on_cpu=True) == act + 20 * 512 * 4 * 2
    assert mp.activations(lora, "fp32", 2, 10, on_cpu=False) == act


def test_zero_stages_bf16_and_offload_by_hand():
    two = dict(dtype="bf16", world=2, batch=2, seq=10, on_cpu=False)
    z2 = {r.name: r for r in mp.supervised_plan(mp.Trained(SHAPE, zero_stage=2), **two).rows}
    assert z2["model parameters"].device == 2 * N
    assert z2["model gradients"].device == 2 * N / 2 + 2 * 5e7  # the partition + ZeRO-2's bucket, whole on a GPU
    on_cpu = mp.supervised_plan(mp.Trained(SHAPE, zero_stage=2), **dict(two, on_cpu=True)).rows
    # On the CPU only the written part of the bucket is resident, and autograd's whole gradients stay resident too.
    assert on_cpu[1].device == 2 * N / 2 + 2 * N + 2 * N
    # ... and the fp32 copy of the gradient partition that DeepSpeed's step makes (on a GPU: gone with the step).
    assert {r.name: r.device for r in on_cpu}["model optimizer step"] == 4 * N / 2
    assert "model optimizer step" not in z2
    assert z2["model optimizer"].device == (8 * N + 4 * N) / 2  # moments + fp32 master, sharded
    z3 = {r.name: r for r in mp.supervised_plan(mp.Trained(SHAPE, zero_stage=3), **two).rows}
    assert z3["model parameters"].device == 2 * N / 2 + 2 * N  # the shard + what ZeRO-3 gathers at a time
    assert z3["model gradients"].device == 2 * N / 2 + 2 * 5e8  # DeepSpeed's default ZeRO-3 reduce bucket
    off = {r.name: r for r in mp.supervised_plan(mp.Trained(SHAPE, zero_stage=2, offload=True), **two).rows}
    assert off["model optimizer"].device == 0 and off["model optimizer"].host == (12 * N + 4 * N) / 2
    checkpointed = mp.supervised_plan(mp.Trained(SHAPE, gradient_checkpointing=True), **two)
    assert list(checkpointed.phases.values()) == [2 * 20 * 64 * 2 + 20 * (960 * 2 + NORMS)
                                                  + 2 * 10 * 1000 * (2 + 12)]


def test_ppo_plan_counts_four_models_and_the_largest_phase():
    actor = mp.Trained(SHAPE)
    critic = mp.Trained(SHAPE, head="score")
    plan = mp.ppo_plan(actor, critic, dtype="fp32", world=1, gen_batch=4, train_batch=2, prompt_len=6,
                       answer_len=4, on_cpu=True, reference=SHAPE, reward=SHAPE)
    rows = {r.name: r.device for r in plan.rows}
    assert rows["reference (frozen)"] == 4 * N and rows["reward model (frozen)"] == 4 * (N + 64)
    kv = 2 * 2 * 32 * 4 * 10 * 4
    phases = list(plan.phases.values())
    assert phases[0] == kv + 4 * 1000 * 4 * 2  # KV cache + a step's logits
    # scoring: the actor's and reference's logits a minibatch (2 rows) at a time, the reward model's hidden states
    assert phases[1] == 2 * 5 * 1000 * (4 + 4) + 4 * 10 * 64 * 4 * 4
    assert phases[2] == 2 * 10 * (960 * 4 + NORMS) * 2 + 2 * 5 * 1000 * 16  # the actor's, logits of 5 positions
    assert phases[3] == 2 * 10 * (960 * 4 + NORMS) * 2  # the critic's: no logits
    static = 20 * N + 20 * (N + 64) + 4 * N + 4 * (N + 64) + RUNTIME
    assert plan.device_peak == static + sum(phases)  # on the CPU what a phase frees stays resident
    gpu = mp.ppo_plan(actor, critic, dtype="fp32", world=1, gen_batch=4, train_batch=2, prompt_len=6,
                      answer_len=4, on_cpu=False, reference=SHAPE, reward=SHAPE)
    assert len(gpu.phases) == 3 and gpu.transient == max(phases)  # on a GPU the largest phase counts


def test_a_plan_that_does_not_fit_names_the_cheapest_changes(monkeypatch):
    from types import SimpleNamespace

    model = SimpleNamespace(model_name_or_path="m", zero_stage=0, lora_dim=0, gradient_checkpointing=False)
    optim = SimpleNamespace(gradient_accumulation_steps=1)
    engine = SimpleNamespace(offload=False, only_optimize_lora=False)
    train = SimpleNamespace(per_device_train_batch_size=8, max_seq_len=512)
    big = mp.Shape(vocab=50000, hidden=1024, layers=24, heads=16, kv_heads=16, head_dim=64, intermediate=4096)
    plan, settings, build = mp.plan_supervised(model, optim, engine, train, head="causal_lm", world=1,
                                               dtype="fp32", on_cpu=True, shape=big)
    # 454M weights: 8.5 GiB of fp32 states with AdamW's temporary, 12.1 GiB of activations and logits at 8 x 512,
    # 21.4 GiB in all. A 14 GiB host fits it with checkpointing (13.2) or micro-batches of 2 (12.4; 4 give 15.4);
    # offload (onto the same host) and LoRA (the activations stay) do not.
    monkeypatch.setattr(mp, "available_memory", lambda on_cpu: (None, 14 * GB))
    printed = []
    with pytest.raises(mp.MemoryPlanError) as e:
        mp.check(plan, settings, build, enforce=True, local_ranks=1, print_fn=printed.append)
    message = str(e.value)
    assert "--gradient_checkpointing" in message and "--per_device_train_batch_size 2 --gradient_accumulation_steps 4" \
        in message, message
    assert message.index("--gradient_checkpointing") < message.index("--per_device_train_batch_size")
    assert "--offload" not in message and "--lora_dim" not in message
    assert "--memory_check false" in message
    assert "estimated peak" in printed[0] and "activations" in printed[0]
    # Two ranks on one host share its RAM: what fits one rank need not fit two.
    monkeypatch.setattr(mp, "available_memory", lambda on_cpu: (None, 64 * GB))
    mp.check(plan, settings, build, enforce=True, local_ranks=2, print_fn=printed.append)
    with pytest.raises(mp.MemoryPlanError):
        mp.check(plan, settings, build, enforce=True, local_ranks=4, print_fn=printed.append)
    mp.check(plan, settings, build, enforce=False, local_ranks=4, print_fn=printed.append)  # a warning only
    assert printed[-1].startswith("WARNING:")


def test_each_step_prints_its_plan_and_refuses_what_does_not_fit(tiny_model_dir, hh_rlhf_sample, tmp_path,
                                                                 monkeypatch, capsys):
    from chatrlhf.training.step1_sft import main as sft_main
    from chatrlhf.training.step1_sft.config import SFTConfig
    from chatrlhf.utils.config import from_flat

    data = hh_rlhf_sample(24, tmp_path)
    flags = dict(model_name_or_path=str(tiny_model_dir("llama")), data_path=[str(data)], data_split="10,0,0",
                 dtype="fp32", output_dir=str(tmp_path / "out"), data_output_path=str(tmp_path / "c"), max_seq_len=64,
                 per_device_train_batch_size=4, max_steps=1, eval_iters=1)
    monkeypatch.setattr(mp, "available_memory", lambda on_cpu: (None, 0.5 * GB))  # less than the runtime alone
    with pytest.raises(mp.MemoryPlanError, match="memory plan of step 1 needs about"):
        sft_main.run(from_flat(SFTConfig, flags))
    assert "memory plan: step 1" in capsys.readouterr().out
    assert not (tmp_path / "out" / "model.safetensors").exists()
    sft_main.run(from_flat(SFTConfig, dict(flags, memory_check=False)))  # the escape hatch
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_reward_pairs_and_grpo_samples_grow_the_plan_by_what_they_allocate():
    """Step 2 trains chosen and rejected rows in one forward; GRPO generates n answers a prompt. The plan grows with
    both by the terms those allocate, and under ZeRO-2 on the CPU by the gradients' fp32 step copy and autograd's
    resident gradients (step 2 measured 32% over the old plan, which missed them)."""
    two = dict(dtype="bf16", world=2, batch=4, seq=256, on_cpu=True)
    score = mp.Trained(SHAPE, head="score", zero_stage=2)
    single = mp.supervised_plan(score, **two)
    pairs = mp.supervised_plan(score, **two, pairs=True)
    tokens = 4 * 256
    block = SHAPE.layers * (960 * 2 + NORMS)  # bf16 values plus the RMSNorms' fp32 inputs
    assert pairs.transient == 2 * single.transient == 2 * tokens * block  # two sequences a pair, no LM logits
    t = SHAPE.num_params("score")
    rows = {r.name: r.device for r in pairs.rows}
    assert rows["model gradients"] == 2 * t / 2 + 2 * t + 2 * t  # partition + bucket (written part) + autograd's
    assert rows["model optimizer step"] == 4 * t / 2

    actor = mp.Trained(SHAPE, zero_stage=2)
    def grpo(n):
        return mp.ppo_plan(actor, None, dtype="bf16", world=2, gen_batch=4 * n, train_batch=4, prompt_len=6,
                           answer_len=4, on_cpu=True, reference=SHAPE, reward=SHAPE)
    one, four = grpo(1), grpo(4)
    kv = 2 * SHAPE.layers * 32 * 10 * 2  # a sequence's KV cache, bf16
    gen = [v for k, v in four.phases.items() if k.startswith("generation")][0]
    assert gen == 16 * kv + 16 * 1000 * 4 * 2  # n answers a prompt: n times the KV cache and the sampling logits
    score1, score4 = ([v for k, v in p.phases.items() if k.startswith("scoring")][0] for p in (one, four))
    # the logits are a minibatch's whatever n; the reward model's forward over every answer grows with n
    assert score4 - score1 == (16 - 4) * 10 * 64 * 2 * 4
    assert four.device_peak > one.device_peak
