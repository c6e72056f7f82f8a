"""Hugging Face output folders (safetensors + config + tokenizer) from any engine's weights, LoRA merged or kept."""
from __future__ import annotations

from pathlib import Path

from chatrlhf.utils.models import merge_lora_state_dict


def write_hf(module, state: dict, out: str | Path, tokenizer=None, lora_scaling: float | None = None,
             keep_lora_adapter: bool = False) -> None:
    """Writes `state` (a full state dict of `module`, an HF model or a peft model around one) to `out`.

    A peft model is saved with its LoRA deltas merged into plain weights (loads with plain transformers), or as
    a peft adapter with `keep_lora_adapter`. Call it on one process (rank 0)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = lora_scaling is not None
    if is_peft and keep_lora_adapter:
        from peft import get_peft_model_state_dict

        module.save_pretrained(str(out), state_dict=get_peft_model_state_dict(module, state_dict=state))
    else:
        base = module.get_base_model() if is_peft else module
        if is_peft:
            state = merge_lora_state_dict(state, lora_scaling, conv1d=base.config.model_type == "gpt2")
        base.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
