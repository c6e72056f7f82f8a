"""Every place chatrlhf touches DeepSpeed ZeRO-3 internals, in one module: a DeepSpeed upgrade is checked here.

Gathering parameters (all at once, or a group of decoder layers at a time), taking the per-module fetch hooks
off while the model runs gathered, and the consolidated 16-bit state dict used for saving.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

from chatrlhf.utils.models import decoder_layers


def gathered(engine):
    """Every parameter of a HybridEngine whole for the duration (a collective under ZeRO-3, nothing otherwise)."""
    if engine.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


def consolidated_state_dict(ds_engine) -> dict:
    """The whole model's 16-bit weights gathered on rank 0 (a collective: every rank calls it)."""
    return ds_engine._zero3_consolidated_16bit_state_dict()


def _offload(ds_engine):
    opt = ds_engine.optimizer
    return opt.parameter_offload if hasattr(opt, "parameter_offload") else opt


@contextmanager
def gathered_without_hooks(ds_engine):
    """All parameters gathered once, fetch hooks off for the duration (as TRL's unwrap_model_for_generation and
    DeepSpeed's own, but restored even when generation raises)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(ds_engine.module.parameters())), fetch_hooks_off(ds_engine):
        yield


@contextmanager
def gathered_by_layer_groups(ds_engine, per_group: int):
    """Bounded memory: the weights outside the decoder layers (embeddings, final norm, head) gathered for the
    duration, the layers `per_group` at a time from the pre-hook of a group's first layer to the hook after its
    last (DeepSpeed-Chat's --tp_gather_partition_size granularity); fetch hooks off, as above."""
    import deepspeed

    _, layers = decoder_layers(ds_engine.module)
    in_layers = {id(p) for p in layers.parameters()}
    rest = [p for p in ds_engine.module.parameters() if id(p) not in in_layers]
    handles, current = [], []

    def gather(params):
        def hook(module, args):
            ctx = deepspeed.zero.GatheredParameters(params)
            ctx.__enter__()
            current.append(ctx)
        return hook

    def release(module, args, output):
        current.pop().__exit__(None, None, None)

    with deepspeed.zero.GatheredParameters(rest), fetch_hooks_off(ds_engine):
        try:
            for start in range(0, len(layers), per_group):
                group = layers[start:start + per_group]
                # Parameter lists are built once here, not per decoding step.
                handles.append(group[0].register_forward_pre_hook(gather(list(group.parameters()))))
                handles.append(group[-1].register_forward_hook(release))
            yield
        finally:
            while current:  # an exception inside a group's forward
                current.pop().__exit__(None, None, None)
            for handle in handles:
                handle.remove()


@contextmanager
def fetch_hooks_off(ds_engine):
    """ZeRO-3's per-module fetch hooks removed for the duration (each forward would re-gather every layer),
    registered again afterwards, also after an exception."""
    offload = _offload(ds_engine)
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)
