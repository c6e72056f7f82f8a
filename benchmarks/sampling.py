"""Sampled generation on CPU: the next token drawn by `torch.multinomial` against the inverse CDF that
`chatrlhf.training.generation` uses there (`sample_categorical`). Same model, prompts and settings, interleaved
(multinomial, inverse CDF, multinomial, ...), in one process. Prints each pair's ratio.

  python benchmarks/sampling.py                          # 4 and 100 rows, as a rollout and step 3's evaluation
  python benchmarks/sampling.py --rows 8 --threads 1 --rounds 5
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext

import torch

from chatrlhf.training import generation
from chatrlhf.utils.models import load_model, load_tokenizer


@contextmanager
def plain_multinomial():
    """The baseline: generation without the inverse-CDF sampler (torch.multinomial as it is)."""
    saved = generation._categorical_sampling
    generation._categorical_sampling = lambda device: nullcontext()
    try:
        yield
    finally:
        generation._categorical_sampling = saved


def timed(model, ids, mask, new_tokens: int, pad_id: int) -> float:
    t0 = time.perf_counter()
    generation.generate(model, ids, mask, max_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=None)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 100])
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=32, help="sampled to the end: no EOS stops a row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = load_model(args.model, tokenizer, head="causal_lm", dtype=dtype).eval()
    results = {}
    with torch.no_grad():
        for rows in args.rows:
            g = torch.Generator().manual_seed(rows)
            ids = torch.randint(100, model.config.vocab_size - 100, (rows, args.prompt_len), generator=g)
            mask = torch.ones_like(ids)
            timed(model, ids, mask, 2, tokenizer.pad_token_id)  # warm-up
            pairs = []
            for _ in range(args.rounds):
                with plain_multinomial():
                    before = timed(model, ids, mask, args.new_tokens, tokenizer.pad_token_id)
                after = timed(model, ids, mask, args.new_tokens, tokenizer.pad_token_id)
                pairs.append((before, after))
            ratios = sorted(b / a for b, a in pairs)
            results[rows] = {"pairs_s": pairs, "ratios": ratios}
            before_s, after_s = (", ".join(f"{p[i]:.2f}" for p in pairs) for i in (0, 1))
            print(f"{rows:>4} rows x {args.new_tokens} tokens, {args.threads} thread(s): multinomial {before_s} s; "
                  f"inverse CDF {after_s} s; median ratio {ratios[len(ratios) // 2]:.2f}x (sorted: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    return results


if __name__ == "__main__":
    main()
