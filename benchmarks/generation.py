"""Generation throughput: the hybrid engine vs plain ZeRO-3 `generate`, side by side on the same weights and prompts;
with --backend vllm, the hybrid engine's HF generation vs its vLLM backend.

  deepspeed --num_gpus 2 benchmarks/generation.py                       # 2 ranks (CPU here, GPUs elsewhere)
  deepspeed --num_gpus 8 benchmarks/generation.py --model smollm2-135m-instruct --batch_size 16
  python benchmarks/generation.py --ranks_note "1 rank"                 # one process
  deepspeed --num_gpus 2 benchmarks/generation.py --backend vllm --batch_size 16   # HF vs vLLM (the [vllm] extra)

Every rank generates greedily for its own prompts with both paths, and with the hybrid engine gathering
--layers_per_gather decoder layers at a time (--unpin_actor_parameters); outputs must agree (same weights, same
prompts), and tokens per second are summed over ranks. Also compares fp32 generation with bf16 autocast on the
same fp32 weights (outputs agreement reported). Prints one table and writes it as JSON with --output.

--backend vllm instead times, for fp32 and bf16 ZeRO-3 actors, the hybrid engine's HF generation (whole actor
gathered) against its vLLM backend (training/vllm_backend.py: one colocated engine per rank, handed the actor's
weights first; that load is timed on its own, generation excludes it), tokens/s summed over ranks, their ratio
(HF also timed before the vLLM engine starts, since a live engine slows the process's other work), and whether
the greedy outputs are identical (fp32) or how many tokens agree (bf16).
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import resource
import time
from pathlib import Path

import torch

from chatrlhf.training.data.render import encode_prompt
from chatrlhf.training.data.sources import BUNDLED, BUNDLED_DIR
from chatrlhf.training.hybrid_engine import build_engine
from chatrlhf.utils import distributed as dist
from chatrlhf.utils.models import load_model, load_tokenizer


def prompts(tokenizer, n: int, offset: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n real HH-RLHF first turns, left-padded."""
    from chatrlhf.training.data.collate import pad

    rows = []
    with gzip.open(BUNDLED_DIR / BUNDLED["hh-rlhf-demo"], "rt") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            text = json.loads(line)["chosen"].split("\n\nAssistant:")[0].replace("\n\nHuman: ", "").strip()
            rows.append(encode_prompt(tokenizer, [{"role": "user", "content": text}])[-max_len:])
            if len(rows) == n:
                break
    return pad(rows, tokenizer.pad_token_id, "left")


def timed_generate(engine, ids, mask, tok, new_tokens: int, repeats: int, **generation_kwargs):
    """Best-of-`repeats` wall time and the output of one path (greedy, fixed length: EOS disabled)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        with engine.generation(**generation_kwargs) as gen:
            out = gen(ids, mask, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=None,
                      do_sample=False)
        dist.barrier()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch_size", type=int, default=4, help="prompts per rank")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--max_prompt_len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers_per_gather", type=int, default=8,
                    help="decoder layers per gather in the bounded-memory path (step 3's --tp_gather_partition_size)")
    ap.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                    help="vllm: time HF generation against the vLLM generation backend instead")
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                    help="the actor dtypes timed with --backend vllm")
    ap.add_argument("--vllm_kv_cache_gb", type=float, default=0.25, help="each rank's vLLM KV cache (--backend vllm)")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    dist.init_distributed()
    torch.manual_seed(0)
    tok = load_tokenizer(args.model, padding_side="left")
    ids, mask = prompts(tok, args.batch_size, offset=args.batch_size * dist.get_rank(), max_len=args.max_prompt_len)
    ids, mask = ids.to(dist.device()), mask.to(dist.device())
    results = {"model": args.model, "ranks": dist.get_world_size(), "prompts_per_rank": args.batch_size,
               "new_tokens": args.new_tokens, "device": dist.accelerator().device_name()}
    tokens = args.batch_size * args.new_tokens * dist.get_world_size()
    if args.backend == "vllm":
        return vllm_vs_hf(args, tok, ids, mask, tokens, results)

    # 1. ZeRO-3 actor (a trainable engine, as in PPO): hybrid generation vs plain ZeRO-3 generate.
    hybrid_out = {}
    for dtype in ("bf16", "fp32"):
        model = load_model(args.model, tok, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        engine = build_engine(model, zero_stage=3, dtype=dtype, micro_batch_size=args.batch_size,
                              learning_rate=1e-6, total_steps=1)
        t_he, out_he = timed_generate(engine, ids, mask, tok, args.new_tokens, args.repeats)
        t_group, out_group = timed_generate(engine, ids, mask, tok, args.new_tokens, args.repeats,
                                            layers_per_gather=args.layers_per_gather)
        t_plain, out_plain = timed_generate(engine, ids, mask, tok, args.new_tokens, 1, gather=False)
        hybrid_out[dtype] = out_he
        results[f"zero3_{dtype}"] = {
            "hybrid_tokens_per_s": tokens / t_he, "plain_zero3_tokens_per_s": tokens / t_plain,
            "speedup": t_plain / t_he, "outputs_identical": bool(torch.equal(out_he, out_plain)),
            "layer_groups_tokens_per_s": tokens / t_group, "layer_groups_speedup": t_plain / t_group,
            "layer_groups_identical": bool(torch.equal(out_group, out_plain))}
        del engine, model

    P = ids.size(1)
    bf16, fp32 = results["zero3_bf16"], results["zero3_fp32"]
    results["bf16_vs_fp32_weights"] = {
        "speedup": bf16["hybrid_tokens_per_s"] / fp32["hybrid_tokens_per_s"],
        "greedy_token_agreement": (hybrid_out["bf16"][:, P:] == hybrid_out["fp32"][:, P:]).float().mean().item()}

    # 2. fp32 weights: fp32 generation vs bf16 autocast (ZeRO 0, the generation cost alone).
    model = load_model(args.model, tok, dtype=torch.float32)
    engine = build_engine(model, zero_stage=0, dtype="fp32", micro_batch_size=args.batch_size, trainable=False)
    t32, out32 = timed_generate(engine, ids, mask, tok, args.new_tokens, args.repeats)
    with torch.autocast(device_type=dist.device().type, dtype=torch.bfloat16):
        t16, out16 = timed_generate(engine, ids, mask, tok, args.new_tokens, args.repeats)
    agree = (out32[:, P:] == out16[:, P:]).float().mean().item()
    results["fp32_vs_bf16_autocast"] = {"fp32_tokens_per_s": tokens / t32, "bf16_autocast_tokens_per_s": tokens / t16,
                                        "speedup": t32 / t16, "greedy_token_agreement": agree}

    if dist.is_main_process():
        print(f"\n== generation benchmark: {args.model}, {results['ranks']} rank(s) on {results['device']}, "
              f"{args.batch_size} prompts/rank, {args.new_tokens} new tokens ==")
        for dtype in ("bf16", "fp32"):
            r = results[f"zero3_{dtype}"]
            print(f"ZeRO-3 {dtype}: hybrid {r['hybrid_tokens_per_s']:8.1f} tok/s | plain ZeRO-3 generate "
                  f"{r['plain_zero3_tokens_per_s']:8.1f} tok/s | ratio {r['speedup']:5.1f}x | "
                  f"identical outputs: {r['outputs_identical']}")
            print(f"ZeRO-3 {dtype}: hybrid, {args.layers_per_gather} layers at a time "
                  f"{r['layer_groups_tokens_per_s']:8.1f} tok/s | ratio to plain {r['layer_groups_speedup']:5.1f}x | "
                  f"identical outputs: {r['layer_groups_identical']}")
        r = results["bf16_vs_fp32_weights"]
        print(f"bf16 vs fp32 weights (hybrid): {r['speedup']:4.2f}x faster in bf16 | greedy token agreement "
              f"{r['greedy_token_agreement']:.1%}")
        r = results["fp32_vs_bf16_autocast"]
        print(f"fp32 weights: fp32 {r['fp32_tokens_per_s']:8.1f} tok/s | bf16 autocast "
              f"{r['bf16_autocast_tokens_per_s']:8.1f} tok/s | ratio {r['speedup']:4.2f}x | "
              f"greedy token agreement {r['greedy_token_agreement']:.1%}")
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))


def vllm_vs_hf(args, tok, ids, mask, tokens: int, results: dict) -> None:
    """--backend vllm: per dtype, a ZeRO-3 actor generating through the hybrid engine with HF, then with its vLLM
    backend (the same weights, handed over once first: that load is timed apart)."""
    from chatrlhf.training import zero3
    from chatrlhf.training.vllm_backend import VLLMGenerator, hf_weights

    P = ids.size(1)
    for dtype in args.dtypes:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = load_model(args.model, tok, dtype=torch_dtype)
        # Frozen (no optimizer state: memory for the vLLM copy on a small machine); gathering is the same.
        engine = build_engine(model, zero_stage=3, dtype=dtype, micro_batch_size=args.batch_size, trainable=False)
        # HF before any vLLM engine exists in the process too: a live (or closed) vLLM engine was seen to slow the
        # process's own torch ops by up to ~25% on a 2-core CPU, which the interleaved figures below include.
        t_hf_alone, _ = timed_generate(engine, ids, mask, tok, args.new_tokens, args.repeats)
        start = time.perf_counter()
        generator = VLLMGenerator(engine.module, dtype=torch_dtype, max_model_len=P + args.new_tokens,
                                  kv_cache_gb=args.vllm_kv_cache_gb, seed=dist.get_rank())
        dist.barrier()
        built = time.perf_counter() - start
        start = time.perf_counter()
        with zero3.gathered(engine), torch.no_grad():  # what generation() does after every PPO update
            generator.load_weights(hf_weights(engine.module, torch_dtype))
        dist.barrier()
        loaded = time.perf_counter() - start
        # A first call each (vLLM's first forward warms its kernels up), then HF and vLLM alternately: on a shared
        # machine both see the same load; best of `repeats` each.
        timed_generate(engine, ids, mask, tok, args.new_tokens, 1, backend=generator)
        t_hf = t_vllm = float("inf")
        for _ in range(args.repeats):
            t, out_hf = timed_generate(engine, ids, mask, tok, args.new_tokens, 1)
            t_hf = min(t_hf, t)
            t, out_vllm = timed_generate(engine, ids, mask, tok, args.new_tokens, 1, backend=generator)
            t_vllm = min(t_vllm, t)
        results[f"zero3_{dtype}"] = {
            "hf_tokens_per_s": tokens / t_hf, "vllm_tokens_per_s": tokens / t_vllm, "vllm_over_hf": t_hf / t_vllm,
            "hf_alone_tokens_per_s": tokens / t_hf_alone, "vllm_over_hf_alone": t_hf_alone / t_vllm,
            "outputs_identical": bool(torch.equal(out_hf, out_vllm)),
            "greedy_token_agreement": (out_hf[:, P:] == out_vllm[:, P:]).float().mean().item(),
            "vllm_engine_start_s": built, "weight_load_s": loaded}
        generator.close()
        del engine, model, generator
        gc.collect()
    results["peak_rss_gb_rank0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    if dist.is_main_process():
        print(f"\n== generation benchmark, HF vs vLLM: {args.model}, {results['ranks']} rank(s) on {results['device']}, "
              f"{args.batch_size} prompts/rank, {args.new_tokens} new tokens, torch threads/rank "
              f"{torch.get_num_threads()} ==")
        for dtype in args.dtypes:
            r = results[f"zero3_{dtype}"]
            print(f"ZeRO-3 {dtype}: HF (hybrid engine) {r['hf_tokens_per_s']:8.1f} tok/s ({r['hf_alone_tokens_per_s']:.1f} "
                  f"before vLLM started) | vLLM {r['vllm_tokens_per_s']:8.1f} tok/s | ratio vLLM/HF "
                  f"{r['vllm_over_hf']:5.2f}x (to HF before vLLM {r['vllm_over_hf_alone']:5.2f}x) | identical outputs: "
                  f"{r['outputs_identical']} (greedy token agreement {r['greedy_token_agreement']:.1%}) | vLLM start "
                  f"{r['vllm_engine_start_s']:.1f} s, weight load {r['weight_load_s']:.2f} s")
        print(f"peak memory of rank 0: {results['peak_rss_gb_rank0']:.2f} GB")
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    dist.run_as_process(main)  # a rank: no interpreter teardown (see there)
