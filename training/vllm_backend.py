"""The hybrid engine's vLLM generation backend (`--generation_backend vllm`): one colocated vLLM engine per rank.

Each rank owns an in-process `vllm.LLM` (tensor_parallel_size 1, vLLM's `external_launcher` executor on the
process group DeepSpeed already runs) that generates that rank's share of the prompts; ranks never wait for each
other while generating. The training engine stays the source of truth: entering the hybrid engine's generation
mode with this backend hands the engine the actor's current weights whenever they changed since the last load
(after every PPO update): gathered once from ZeRO-3 (`zero3.gathered`), LoRA folded in, cast to the dtype vLLM
runs, and streamed as (name, tensor) pairs into vLLM's in-place `reload_weights`. Nothing is written to disk but
the model's config.json (the engine starts from the config with dummy weights). Between rollouts the engine
releases what it can: on GPU, vLLM's sleep mode (level 2: weights and KV cache freed, buffers kept; woken and
reloaded before the next rollout); on CPU nothing can be released, so the KV cache is a fixed reservation set by
`kv_cache_gb` (--vllm_kv_cache_gb; vLLM's VLLM_CPU_KVCACHE_SPACE, when set, takes precedence).

Sampling is ours, exactly: temperature, top-p, top-k, max new tokens, stop at EOS (kept in the output, as HF
does) and nothing else -- SamplingParams are built explicitly, the checkpoint's generation_config is ignored, no
repetition/presence/frequency penalties, no min-p. The output is what HF generate returns: the (left-padded)
prompt ids followed by the answers, right-padded with pad_token_id to the longest answer of the batch.

vLLM's log-probs of the sampled tokens are kept (`last_logprobs`) only to measure how far they are from the
training engine's (`record_logprobs`, logged as rollout/vllm_logprob_mismatch); PPO's old log-probs always come
from the training engine's forward. What vLLM does to a training process, what it can run, and the clear
errors when it cannot are in training/vllm_compat.py. Importing this module imports neither vllm nor deepspeed.
"""
from __future__ import annotations

import gc
import logging
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch

from chatrlhf.training import vllm_compat
from chatrlhf.training.vllm_compat import (USE_HF, VLLMBackendError, check_supported, import_vllm,
                                           process_state_kept)
# Re-exported: the flags' modules, the tests and the benchmarks import these from here.
from chatrlhf.training.vllm_compat import INSTALL_HINT, require_vllm, vllm_installed  # noqa: F401

logger = logging.getLogger(__name__)

GenerationBackend = Literal["hf", "vllm"]  # the type of every --generation_backend flag
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def architecture(model: torch.nn.Module) -> str:
    """The Hugging Face architecture name vLLM looks up (`LlamaForCausalLM`, ...)."""
    return type(_base_model(model)).__name__


def logprobs_mode(temperature: float) -> str:
    """Which vLLM log-probs compare exactly with the training engine's log_softmax(logits / temperature) over the
    whole vocabulary: the raw ones at temperature 1 (whatever top-p/top-k do), the temperature-scaled ones
    otherwise (exact without top-p/top-k; with them vLLM's also carry the truncation's renormalisation)."""
    return "raw_logprobs" if temperature == 1.0 else "processed_logprobs"


def hf_weights(model: torch.nn.Module, dtype: torch.dtype, device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter under its Hugging Face checkpoint name, in `dtype`, LoRA folded in.

    A peft model's names lose `base_model.model.` and `.base_layer`; the adapters are not listed but added to their
    base weight (W + scaling * B @ A, peft's get_delta_weight, which also handles GPT-2's transposed Conv1D) as the
    tensor is produced, so nothing in the model changes. Tied weights come under each of their names (vLLM's in-place
    reload counts a module as loaded only when its own names came). Lazy: under ZeRO-3 consume it inside the gather."""
    base = _base_model(model)
    lora = {}
    if base is not model:
        from peft.tuners.lora import LoraLayer

        lora = {id(m.get_base_layer().weight): m for m in base.modules() if isinstance(m, LoraLayer)}
    for name, p in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        tensor = p.detach()
        layer = lora.get(id(p))
        if layer is not None:
            deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
            if deltas:
                tensor = (tensor.float() + sum(d.float() for d in deltas)).to(tensor.dtype)
        yield name, tensor.to(device=device if device is not None else tensor.device, dtype=dtype)


class VLLMGenerator:
    """One rank's colocated vLLM engine for the model `model` (an HF causal LM or a peft model around one).

    `dtype`: what vLLM runs in (the training dtype); `max_model_len`: the longest prompt + answer it must hold;
    `kv_cache_gb`: its KV cache; `gpu_memory_utilization`: on GPU, the share of device memory vLLM may take
    (the training engines share the device); `temperature`: the run's sampling temperature (which log-probs to
    compare, see logprobs_mode). The engine holds dummy weights until the first `load_weights`/`generation`.
    """

    def __init__(self, model: torch.nn.Module, *, dtype: torch.dtype, max_model_len: int | None = None,
                 kv_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 temperature: float = 1.0, enforce_eager: bool = True):
        vllm = import_vllm()
        from chatrlhf.utils import distributed as dist

        if dtype not in _DTYPES:
            raise ValueError(f"vLLM backend: unsupported dtype {dtype}")
        if kv_cache_gb <= 0:
            raise ValueError(f"--vllm_kv_cache_gb must be > 0, got {kv_cache_gb}")
        self.arch = architecture(model)
        check_supported(self.arch)
        dist.init_distributed()  # the external_launcher executor joins this process group
        from vllm.platforms import current_platform

        self.on_gpu = not current_platform.is_cpu()
        self.dtype, self.config = dtype, _base_model(model).config
        self._config_dir = tempfile.TemporaryDirectory(prefix="chatrlhf-vllm-")
        config = self.config.to_dict()
        config["architectures"] = [self.arch]  # a model built from a config has none
        config.pop("quantization_config", None)
        type(self.config).from_dict(config).to_json_file(str(Path(self._config_dir.name) / "config.json"))
        kwargs = dict(model=self._config_dir.name, load_format="dummy", skip_tokenizer_init=True,
                      dtype=_DTYPES[dtype], tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                      seed=seed, max_model_len=max_model_len, enforce_eager=enforce_eager, generation_config="vllm",
                      logprobs_mode=logprobs_mode(temperature), kv_cache_memory_bytes=int(kv_cache_gb * 2**30),
                      trust_remote_code=False)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        vllm_compat.ENGINES.add(self)  # from here on, vLLM's shutdown of another engine leaves the groups alone
        try:
            with process_state_kept(model):
                self.llm = vllm.LLM(**kwargs)
                # One token through the model on its dummy weights: kernels that do not support this model (CPU
                # attention below head_dim 32, ...) fail here, at start-up, not in the middle of the first rollout.
                self.llm.generate([{"prompt_token_ids": [0]}], vllm.SamplingParams(max_tokens=1, temperature=0.0,
                                                                                  detokenize=False), use_tqdm=False)
        except Exception as e:
            vllm_compat.ENGINES.discard(self)
            raise VLLMBackendError(f"--generation_backend vllm: vLLM {vllm.__version__} could not start an engine "
                                   f"for {self.arch} ({e}); {USE_HF}") from e
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._loaded = None   # weakref to the HybridEngine whose weights the engine holds, and its step
        self._sleeping: set[str] = set()  # GPU: what vLLM's sleep mode has freed
        self.last_logprobs: torch.Tensor | None = None  # (B*n, R) vLLM's log-probs of the last batch's tokens
        self._mismatch = [0.0, 0]  # summed |vLLM - training| log-prob difference, token count

    # ---- weights ----------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Streams (name, tensor) pairs in HF checkpoint names into the engine, in place (vLLM's model-runner
        reload_weights: the model's own load_weights plus its post-load processing); the prefix cache, computed
        with the old weights, is dropped."""
        self._wake(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def load_from(self, model: torch.nn.Module) -> None:
        """The weights of a plain (un-partitioned) model, LoRA folded in (the chatbot, prompt_eval)."""
        with torch.no_grad():
            self.load_weights(hf_weights(model, self.dtype))
        self._loaded = None

    def invalidate(self) -> None:
        """Forget which weights the engine holds: the next generation() loads them again."""
        self._loaded = None

    @contextmanager
    def generation(self, engine):
        """The hybrid engine's generation mode with this backend (HybridEngine.generation(backend=...)): loads
        `engine`'s weights when they changed since the last load (a collective under ZeRO-3: every rank enters),
        yields `generate`, then lets the engine sleep (GPU)."""
        from chatrlhf.training import zero3

        step = getattr(engine.engine, "global_steps", 0)  # DeepSpeed counts optimizer steps: weights changed
        held = self._loaded is not None and self._loaded[0]() is engine and self._loaded[1] == step
        if not held:
            with zero3.gathered(engine), torch.no_grad():
                self.load_weights(hf_weights(engine.module, self.dtype))
            self._loaded = (weakref.ref(engine), step)
        self._wake(["weights", "kv_cache"])
        try:
            yield self.generate
        finally:
            self._sleep()

    def _wake(self, tags: list[str]) -> None:
        asleep = [t for t in tags if t in self._sleeping]
        if asleep:  # weights first, then the KV cache: the peak holds one of them, not both plus the gather
            self.llm.wake_up(tags=asleep)
            self._sleeping.difference_update(asleep)

    def _sleep(self) -> None:
        """GPU: frees the weights and the KV cache until the next rollout (level 2: the weights are reloaded anyway
        after each update). CPU: vLLM has no sleep mode; the KV cache reservation stays."""
        if self.on_gpu:
            self.llm.sleep(level=2)
            self._sleeping, self._loaded = {"weights", "kv_cache"}, None

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 pad_token_id: int, eos_token_id: int | None, do_sample: bool = True, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, n: int = 1, num_return_sequences: int = 1, num_beams: int = 1,
                 penalty_alpha: float = 0.0, streamer=None, synced_gpus: bool = False) -> torch.Tensor:
        """(B, P) left-padded prompts -> (B*n, P+R) sequences, as HF generate returns them: each prompt row
        (pads included) followed by its answer, answers right-padded with pad_token_id to the longest one (R),
        an answer ending at its first EOS (included). `n` (or HF's num_return_sequences) answers per prompt are
        adjacent rows. Sampling seeds come from torch's RNG, so runs repeat and a prompt's answer does not depend
        on what it is batched with. `streamer` (batch of one) gets the whole answer at the end."""
        from vllm import SamplingParams

        if num_beams != 1 or penalty_alpha:
            raise ValueError("the vllm generation backend samples or decodes greedily; beam search (--num_beams) "
                             "and contrastive search (--penalty_alpha) need --generation_backend hf")
        n = n * num_return_sequences
        B, P = input_ids.shape
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(f"vLLM backend: a prompt of {longest - max_new_tokens} tokens + {max_new_tokens} new "
                             f"tokens exceeds the engine's max_model_len {self.max_model_len}")
        seeds = torch.randint(0, 2**31 - 1, (B,)).tolist() if do_sample else [None] * B
        params = [SamplingParams(
            n=n, temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0,
            top_k=top_k if do_sample else 0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
            frequency_penalty=0.0, max_tokens=max_new_tokens, min_tokens=0,
            stop_token_ids=[eos_token_id] if eos_token_id is not None else [], ignore_eos=True, logprobs=0,
            detokenize=False, skip_special_tokens=False, seed=seed) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        answers = [c for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
        R = max(len(c.token_ids) for c in answers)
        responses = torch.full((B * n, R), pad_token_id, dtype=input_ids.dtype)
        logprobs = torch.zeros(B * n, R)
        for i, c in enumerate(answers):
            ids = list(c.token_ids)
            responses[i, :len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
            if c.logprobs:
                logprobs[i, :len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
        self.last_logprobs = logprobs
        sequences = torch.cat([input_ids.repeat_interleave(n, dim=0), responses.to(input_ids.device)], dim=1)
        if streamer is not None:
            streamer.put(input_ids[0].cpu())
            streamer.put(responses[0, :len(answers[0].token_ids)])
            streamer.end()
        return sequences

    # ---- the two engines' agreement -----------------------------------------------------------------------
    def record_logprobs(self, logprobs: torch.Tensor, action_mask: torch.Tensor) -> float:
        """(B, R) training-engine log-probs of the last batch's tokens, (B, R) mask -> mean |vLLM - training| over
        the masked tokens (also accumulated for `pop_metrics`). Near 0 in fp32; it grows when the engines
        disagree (bf16 kernels, a weight-loading bug, sampling settings vLLM applies differently)."""
        if self.last_logprobs is None or self.last_logprobs.shape != logprobs.shape:
            raise ValueError("record_logprobs: no vLLM batch of this shape was just generated")
        mask = action_mask.bool().cpu()
        diff = (self.last_logprobs - logprobs.detach().float().cpu()).abs()[mask]
        self._mismatch[0] += diff.sum().item()
        self._mismatch[1] += diff.numel()
        return diff.mean().item() if diff.numel() else 0.0

    def pop_totals(self) -> tuple[float, int]:
        """(summed |vLLM - training| log-prob difference, tokens) recorded since the last pop."""
        totals, self._mismatch = tuple(self._mismatch), [0.0, 0]
        return totals

    def pop_metrics(self, prefix: str = "rollout") -> dict:
        """{prefix/vllm_logprob_mismatch: mean over the tokens recorded since the last pop} (empty if none)."""
        total, count = self.pop_totals()
        return {f"{prefix}/vllm_logprob_mismatch": total / count} if count else {}

    def close(self) -> None:
        """Shuts the engine down and frees its memory; torch's default process group stays (DeepSpeed's), and so
        do vLLM's while another engine of this process is alive (vllm_compat._share_vllm_groups)."""
        vllm_compat.ENGINES.discard(self)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # best effort: the process may be exiting
                logger.debug("vLLM shutdown: %r", e)
            del llm
        gc.collect()
        self._config_dir.cleanup()


def generator_for(model: torch.nn.Module, *, dtype: torch.dtype, max_model_len: int | None = None,
                  kv_cache_gb: float = 1.0, seed: int = 0) -> VLLMGenerator:
    """A generator holding the weights of the plain model `model` (inference: the chatbot)."""
    generator = VLLMGenerator(model, dtype=dtype, max_model_len=max_model_len, kv_cache_gb=kv_cache_gb, seed=seed)
    try:
        generator.load_from(model)
    except BaseException:
        generator.close()  # not left for the garbage collector to shut down at some later point
        raise
    return generator
