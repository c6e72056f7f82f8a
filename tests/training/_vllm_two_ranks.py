"""Two-rank ZeRO-3 check of the vLLM generation backend, launched by tests/training/test_vllm_backend.py through the
deepspeed launcher (not collected by pytest).

Each rank builds its own vLLM engine and greedily decodes its OWN prompts (a different number, a different
max_new_tokens, an EOS that ends one row early), so the ranks leave generation at different times; neither may
wait for the other. For the actor with and without LoRA: vLLM's output equals HF generate's through the hybrid
engine (gathered ZeRO-3 weights), then two training steps (ZeRO-3 collectives: a hang would show here), then
vLLM again equals HF on the new weights. Each rank writes `<out>/rank_<r>.json`.

  deepspeed --num_gpus 2 tests/training/_vllm_two_ranks.py --model DIR --out DIR --zero_config FILE
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from chatrlhf.training.hybrid_engine import build_engine
from chatrlhf.training.vllm_backend import VLLMGenerator
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.models import add_lora, load_model, load_tokenizer

PROMPTS = {0: ["hello there", "The quick brown fox jumps"],
           1: ["how can I help?", "dog", "Human: the lazy"]}
MAX_NEW_TOKENS = {0: 5, 1: 14}


def run_case(model_dir: str, tok, zero_config: str, generator: VLLMGenerator, lora: bool) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same LoRA weights on every rank
    model = load_model(model_dir, tok)
    if lora:
        model = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=False)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters change the output
                torch.nn.init.normal_(p, std=0.3)
    engine = build_engine(model, zero_stage=3, dtype="fp32", micro_batch_size=2, learning_rate=5e-2,
                          user_config_path=zero_config)
    enc = tok(PROMPTS[rank], return_tensors="pt", padding=True)
    n, P = MAX_NEW_TOKENS[rank], enc.input_ids.size(1)

    def both(eos):
        kw = dict(max_new_tokens=n, pad_token_id=tok.pad_token_id, eos_token_id=eos, do_sample=False)
        with engine.generation() as gen:
            hf = gen(enc.input_ids, enc.attention_mask, **kw)
        with engine.generation(backend=generator) as gen:
            vl = gen(enc.input_ids, enc.attention_mask, **kw)
        return hf, vl

    free, _ = both(None)
    eos = int(free[0, P + min(2, n - 1)])  # the first row stops there, the others run on
    hf, vl = both(eos)
    equal_before = torch.equal(hf, vl)
    engine.train()
    batch = tok(["a short training text", "another one"], return_tensors="pt", padding=True)
    for _ in range(2):
        engine.backward(engine(**batch, labels=batch.input_ids).loss)
        engine.step()
    hf2, vl2 = both(eos)
    return {"equal_before": equal_before, "equal_after": torch.equal(hf2, vl2), "changed": not torch.equal(hf, hf2),
            "first_difference": (vl2 != hf2).nonzero()[:1].tolist() if vl2.shape == hf2.shape else "shape",
            "vllm": vl2.tolist(), "hf": hf2.tolist(), "response_width": int(vl.size(1)) - P,
            "response_lengths": [_length(r, eos) for r in vl[:, P:]]}


def _length(response: torch.Tensor, eos: int) -> int:
    hits = (response == eos).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else len(response)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero_config", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the launcher
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_distributed()
    tok = load_tokenizer(args.model, padding_side="left")
    generator = VLLMGenerator(load_model(args.model, tok), dtype=torch.float32, max_model_len=64, kv_cache_gb=0.05,
                              seed=dist.get_rank())
    results = {f"lora={int(lora)}": run_case(args.model, tok, args.zero_config, generator, lora) for lora in (False, True)}
    Path(args.out, f"rank_{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    generator.close()


if __name__ == "__main__":
    dist.run_as_process(main)  # a rank: no interpreter teardown (see there)
