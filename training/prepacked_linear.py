"""bf16 linear layers with their weights prepacked for oneDNN while generating on a CPU with bf16 instructions.

`F.linear` on bf16 CPU tensors hands the weight to oneDNN, which reorders it into its blocked layout on every
call: a decoding step of a few rows is bound by memory bandwidth, so that reorder doubles what it reads. Packed
once per `generate` call, SmolLM2-135M's 211 linear layers took 12.4 ms instead of 22.4 ms for 4 rows on one
thread of the AVX512-BF16 EPYC (packing them: 0.1 s). The packed kernel is the same oneDNN GEMM: the outputs are
bit for bit those of `F.linear` (tested for 1 to 480 rows).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from chatrlhf.training import memory_plan, precision

logger = logging.getLogger(__name__)

# Packing holds a second copy of every weight for the call: only when that takes at most this share of free RAM.
MAX_SHARE_OF_FREE_RAM = 0.5
# oneDNN picks the packed layout for this many rows: from 4 rows up as fast as the default layout for 4 and 100
# rows, and packed in 75 ms instead of 178 ms (SmolLM2's blocks, one thread).
ROWS_HINT = 64
_PACKED = "_chatrlhf_packed"  # set on a module while its linears run packed (a nested generate packs nothing)


def _available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (precision.fast_paths_enabled() and torch.backends.mkldnn.is_available() and precision.native_bf16_matmul()
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


def _packable(layer: torch.nn.Module) -> bool:
    """A plain bf16 CPU linear layer whose weight is there (ZeRO-3 keeps empty placeholders between gathers)."""
    w = getattr(layer, "weight", None)
    return (type(layer) is torch.nn.Linear and "forward" not in vars(layer) and isinstance(w, torch.Tensor)
            and w.device.type == "cpu" and w.dtype == torch.bfloat16
            and tuple(w.shape) == (layer.out_features, layer.in_features)
            and (layer.bias is None or layer.bias.dtype == torch.bfloat16))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) bf16 weight -> oneDNN's blocked copy of it."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=ROWS_HINT)


def _packed_forward(layer: torch.nn.Linear, packed: torch.Tensor):
    plain = layer.forward  # the class's forward, bound: what runs outside the fast case
    bias = None if layer.bias is None else layer.bias.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        # Only where nothing needs a graph: the packed op has no backward.
        if (x.dtype != torch.bfloat16 or x.numel() == 0
                or (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))):
            return plain(x)
        return packed_linear(x, packed, bias)

    return forward


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with `packed = pack(weight)`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@contextmanager
def prepacked_linears(module: torch.nn.Module):
    """Inside: every plain bf16 `nn.Linear` of `module` runs on a packed copy of its weight (see the module doc),
    its weights unchanged; leaving restores the layers' own forwards, also after an error. A no-op elsewhere: on
    GPUs, CPUs without bf16 instructions, fp32 weights, under $CHATRLHF_FAST_PATHS=0, inside another
    `prepacked_linears` of the same module, and when the copies would take more than half the free host RAM.
    The weights must not change inside (generation does not change them)."""
    if getattr(module, _PACKED, False) or not _available():
        yield
        return
    layers = [m for m in module.modules() if _packable(m)]
    need = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    free = memory_plan.host_memory_available()
    if not layers or (free is not None and need > MAX_SHARE_OF_FREE_RAM * free):
        if layers:
            logger.info("generating without prepacked weights: %.2f GB of copies, %.2f GB of RAM free",
                        need / 1e9, free / 1e9)
        yield
        return
    patched = []
    try:
        for layer in layers:
            layer.forward = _packed_forward(layer, pack(layer.weight))
            patched.append(layer)
    except RuntimeError as error:  # a oneDNN build that cannot pack: generate as before, and say so
        logger.warning("generating without prepacked weights: packing failed (%s)", error)
        _restore(patched)
        yield
        return
    setattr(module, _PACKED, True)
    try:
        yield
    finally:
        _restore(patched)
        delattr(module, _PACKED)


def _restore(layers) -> None:
    for layer in layers:
        del layer.forward  # back to the class's forward
