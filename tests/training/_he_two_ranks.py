"""Two-rank ZeRO-3 check of the hybrid engine, launched by tests/training/test_hybrid_engine.py through the
deepspeed launcher (not collected by pytest).

Each rank greedily decodes its OWN prompts (a different number of them, a different max_new_tokens and an
EOS that ends one row early), so the ranks leave `generate` at different times. For every case (with and
without LoRA; parameters gathered at once, a layer at a time, or fetched per module with `gather=False`) the
hybrid engine's output is compared with plain `generate` on an un-wrapped copy of the same weights, then one
training step runs (the ZeRO-3 hooks are back). Each rank writes `<out>/rank_<r>.json`.

  deepspeed --num_gpus 2 tests/training/_he_two_ranks.py --model DIR --out DIR
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from chatrlhf.training.hybrid_engine import build_engine
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.models import add_lora, load_model, load_tokenizer

PROMPTS = {0: ["hello there", "The quick brown fox jumps"],
           1: ["how can I help?", "dog", "Human: the lazy"]}
MAX_NEW_TOKENS = {0: 5, 1: 14}


def greedy(model, tok, enc, max_new_tokens: int, eos: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=eos)


MODES = {"1": dict(gather=True), "layers": dict(gather=True, layers_per_gather=1), "0": dict(gather=False)}


def run_case(model_dir: str, tok, zero_config: str, lora: bool, mode: dict) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same LoRA weights on every rank
    model = load_model(model_dir, tok)
    if lora:
        model = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=False)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters change the output
                torch.nn.init.normal_(p, std=0.3)
    plain = copy.deepcopy(model).eval()
    engine = build_engine(model, zero_stage=3, dtype="fp32", micro_batch_size=2, learning_rate=1e-3,
                          user_config_path=zero_config)
    enc = tok(PROMPTS[rank], return_tensors="pt", padding=True)
    n = MAX_NEW_TOKENS[rank]
    # An EOS that the first row emits early: that row stops, the others run on to max_new_tokens.
    free = greedy(plain, tok, enc, n, eos=tok.eos_token_id)[0, enc.input_ids.size(1):]
    eos = int(free[min(2, len(free) - 1)])
    expected = greedy(plain, tok, enc, n, eos)
    with engine.generation(**mode) as gen:
        got = gen(enc.input_ids, enc.attention_mask, max_new_tokens=n, pad_token_id=tok.pad_token_id,
                  eos_token_id=eos, do_sample=False)
    # A training step afterwards: ZeRO-3's fetch hooks and the training mode are back.
    engine.train()
    batch = tok(["a short training text", "another one"], return_tensors="pt", padding=True)
    loss = engine(**batch, labels=batch.input_ids).loss
    engine.backward(loss)
    engine.step()
    responses = got[:, enc.input_ids.size(1):]
    return {"equal": torch.equal(got, expected), "hybrid": got.tolist(), "plain": expected.tolist(),
            "response_lengths": [_length(r, eos) for r in responses],
            "width": int(got.size(1)), "eos": eos, "loss": loss.item(), "training": engine.module.training}


def _length(response: torch.Tensor, eos: int) -> int:
    """Tokens up to and including the first EOS (the whole row when there is none)."""
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
    results = {f"lora={int(lora)},gather={name}": run_case(args.model, tok, args.zero_config, lora, mode)
               for lora in (False, True) for name, mode in MODES.items()}
    Path(args.out, f"rank_{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    dist.run_as_process(main)  # a rank: no interpreter teardown (see there)
