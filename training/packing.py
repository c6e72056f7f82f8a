"""Padding-free forwards: a padded batch's real tokens packed into one row, each sequence attending to itself only.

Step 3 scores and trains on left-padded prompts and right-padded answers; on the dschat workload a quarter of a
batch's tokens are padding, and a CPU spends as long on a padding token as on a real one. Packed, the linear
layers and elementwise ops see only the real tokens, and attention runs as one causal `scaled_dot_product_attention`
per sequence (`Segments`), so no (N, N) mask is built and no cross-sequence block is computed. Every real token
gets the value the padded forward gives it, to the kernels' rounding; padding positions get `fill`.

Applies to models whose attention goes through torch's SDPA once per layer with position ids restarting per
sequence (Llama, Qwen, Mistral without a sliding window, GPT-2, OPT...): `packable` checks what it can, and a
forward whose SDPA calls do not come out one per layer is discarded (`call` returns None) so the caller runs it
padded.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@dataclass
class Packed:
    """The real tokens of a (B, T) batch in one (1, N) row."""
    input_ids: torch.Tensor     # (1, N)
    position_ids: torch.Tensor  # (1, N): 0, 1, ... within each sequence
    lengths: list[int]          # B sequence lengths, summing to N
    index: torch.Tensor         # (N,) long: each packed token's flat position in the (B * T) batch
    shape: tuple[int, int]      # (B, T)

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(1, N, ...) -> (B, T, ...), padding positions `fill` (differentiable)."""
        B, T = self.shape
        out = x.new_full((B * T,) + tuple(x.shape[2:]), fill)
        return out.index_copy(0, self.index, x[0]).view(B, T, *x.shape[2:])

    def positions(self, where: torch.Tensor) -> torch.Tensor:
        """where (B, T) bool, true only on real tokens -> (K,) their positions in the packed row, in row-major
        order (what `torch.Tensor.__getitem__(where)` would give on the padded batch)."""
        B, T = self.shape
        packed_at = torch.full((B * T,), -1, dtype=torch.long, device=self.index.device)
        packed_at[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        picked = packed_at[where.reshape(-1).nonzero().squeeze(1)]
        if bool((picked < 0).any()):
            raise ValueError("a position asked for is padding: it has no packed token")
        return picked


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed | None:
    """(B, T) ids and 0/1 mask -> Packed, or None where packing saves nothing (one row, no padding) or cannot keep
    the positions (a row's real tokens are not one contiguous run, e.g. padding inside a sequence)."""
    B, T = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if B < 2 or bool(mask.all()) or not bool((lengths > 0).all()):
        return None
    first = mask.long().argmax(1)
    span = torch.arange(T, device=mask.device)[None]
    if not bool((mask == ((span >= first[:, None]) & (span < (first + lengths)[:, None]))).all()):
        return None
    index = mask.reshape(-1).nonzero().squeeze(1)
    lengths_list = lengths.tolist()
    position_ids = torch.cat([torch.arange(n, device=mask.device) for n in lengths_list])[None]
    return Packed(input_ids=input_ids.reshape(-1)[index][None], position_ids=position_ids, lengths=lengths_list,
                  index=index, shape=(B, T))


def packable(hf_model: torch.nn.Module) -> bool:
    """Whether `hf_model` (the plain Hugging Face model) can take a packed row: SDPA attention, position ids as an
    argument (so each sequence restarts at 0), decoder-only. A sliding window is checked per batch (`window`)."""
    config = getattr(hf_model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "alibi", False):
        return False
    return "position_ids" in inspect.signature(hf_model.forward).parameters


class Segments(TorchFunctionMode):
    """Within it, SDPA over the packed row's N tokens runs as one causal SDPA per sequence (the mask the model
    built is not needed and is ignored); `calls` counts them, and `foreign` the SDPA calls over anything else, for
    the caller's check."""

    def __init__(self, lengths: list[int]):
        super().__init__()
        self.lengths, self.total, self.calls, self.foreign = lengths, sum(lengths), 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        # SDPA's positional order; the mask and is_causal are replaced by causal attention per sequence.
        given = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
        q, k, v = given.pop("query"), given.pop("key"), given.pop("value")
        if q.dim() != 4 or q.size(0) != 1 or q.size(-2) != self.total or k.size(-2) != self.total:
            self.foreign += 1  # not over the packed row: run as asked; the caller refuses the forward after it
            return func(*args, **kwargs)
        self.calls += 1
        extra = {key: value for key, value in given.items() if key not in ("attn_mask", "is_causal")}
        outputs, start = [], 0
        for n in self.lengths:
            end = start + n
            outputs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end],
                                                          v[:, :, start:end], is_causal=True, **extra))
            start = end
        return torch.cat(outputs, dim=2)


def layer_count(hf_model: torch.nn.Module) -> int | None:
    config = getattr(hf_model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


_REFUSED = "_chatrlhf_unpackable"  # set on a model whose packed forward was refused: it runs padded from then on


def maybe_pack(hf_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed | None:
    """The packed batch when this forward should run packed (fast paths on, a CPU, a packable model that has not
    been refused, not recomputing checkpointed blocks in a backward, and padding to save), else None."""
    from chatrlhf.training.precision import fast_paths_enabled
    from chatrlhf.training.value_model import checkpointing

    if (not fast_paths_enabled() or input_ids.device.type != "cpu" or getattr(hf_model, _REFUSED, False)
            or not packable(hf_model)
            # checkpointing recomputes blocks in the backward, outside the per-sequence attention
            or (torch.is_grad_enabled() and checkpointing(hf_model))):
        return None
    packed = pack(input_ids, attention_mask)
    limit = window(hf_model)
    if packed is not None and limit is not None and max(packed.lengths) > limit:
        return None  # SDPA per sequence is full causal attention: only right within the window
    return packed


def window(hf_model: torch.nn.Module) -> int | None:
    """The sliding-window length `hf_model` attends within, if any (Mistral's, Qwen2's with use_sliding_window)."""
    config = hf_model.config
    size = getattr(config, "sliding_window", None)
    if not isinstance(size, int) or getattr(config, "use_sliding_window", True) is False:
        return None
    return size


def call(model, hf_model: torch.nn.Module, packed: Packed, **kwargs):
    """model(packed row, **kwargs) with attention per sequence, or None (and `hf_model` runs padded from then on)
    if SDPA did not run once per layer of `hf_model`, the plain Hugging Face model inside `model`."""
    expected = layer_count(hf_model)
    with Segments(packed.lengths) as segments:
        out = model(input_ids=packed.input_ids, attention_mask=torch.ones_like(packed.input_ids),
                    position_ids=packed.position_ids, use_cache=False, **kwargs)
    if expected is not None and segments.calls == expected and not segments.foreign:
        return out
    setattr(hf_model, _REFUSED, True)
    logging.getLogger(__name__).warning(
        "%s: padded forwards from now on (%d attention calls over the packed row and %d over other shapes in a "
        "packed forward, expected %s and 0)", type(hf_model).__name__, segments.calls, segments.foreign, expected)
    return None


def logits_at(model, hf_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              where: torch.Tensor) -> torch.Tensor | None:
    """(K, V) logits at the K real positions `where` (B, T) marks, row-major, from a padding-free forward that runs
    the head on those positions only where the family takes `logits_to_keep`; None where packing does not apply."""
    packed = maybe_pack(hf_model, input_ids, attention_mask)
    if packed is None:
        return None
    keep = packed.positions(where)
    takes_keep = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
    out = call(model, hf_model, packed, **({"logits_to_keep": keep} if takes_keep else {}))
    if out is None:
        return None
    return out.logits[0] if takes_keep else out.logits[0, keep]
