"""Loading any Hugging Face causal LM (by hub id or path), its tokenizer, dropout, LoRA and checkpointing.

The pad rule: the pad token is never the EOS token. DeepSpeed-Chat set pad = eos, which masks the generated EOS
out of the loss and makes "the last non-pad token" ambiguous for the reward model. We pick an existing special
token that is not EOS, or add `<|pad|>` (and grow the embeddings) when there is none.

No code from a model folder or hub repo runs: `trust_remote_code` is passed as False (transformers would otherwise
ask on a terminal and run the repo's Python on "y") unless a caller explicitly turns it on.
"""
from __future__ import annotations

import logging
import os
import re

import torch

from chatrlhf.utils.smollm2 import resolve_model_path

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
# Output heads never get LoRA: they are tied to the embeddings or are the reward/value head itself.
HEAD_NAMES = ("lm_head", "score", "embed_out", "v_head")


def looks_local(name_or_path: str) -> bool:
    """A path, not a hub id: absolute, starting with . or ~, or with more than the one slash of `org/name`."""
    p = str(name_or_path)
    return p.startswith((".", "~")) or os.path.isabs(p) or p.count("/") > 1 or "\\" in p


def model_location(name_or_path: str) -> str:
    """What from_pretrained should get: a local folder (checked to exist) or a hub id, passed on unchanged.
    A missing local path fails here, naming it, instead of as a hub error about repo-id syntax."""
    path = resolve_model_path(name_or_path)
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if looks_local(path):
        full = os.path.abspath(os.path.expanduser(path))
        what = "is a file, not a model folder" if os.path.exists(full) else "no such folder"
        raise FileNotFoundError(f"model {name_or_path!r}: {what}: {full}")
    return path


def _remote_code_error(name_or_path: str, e: ValueError) -> ValueError:
    """transformers' custom-code refusal -> one naming the model, without its advice to turn the code on."""
    if "trust_remote_code" not in str(e):
        return e
    return ValueError(f"model {name_or_path!r} needs its own Python code (an auto_map in its config) to load; "
                      "chatrlhf does not run code from model files (trust_remote_code is off)")


def load_tokenizer(name_or_path: str, padding_side: str = "right", trust_remote_code: bool = False):
    """The model's own tokenizer with a pad token distinct from EOS (see the module docstring)."""
    from transformers import AutoTokenizer

    path = model_location(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise OSError(f"cannot load a tokenizer from {name_or_path!r}: {e}") from e
    except ValueError as e:
        raise _remote_code_error(name_or_path, e) from None
    if tok.eos_token is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no EOS token; chatrlhf needs one to end answers")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        candidates = [t for t in (tok.unk_token, tok.bos_token) if t is not None and t != tok.eos_token]
        # A bos used as pad is fine: masks come from attention_mask, and scores are read at the last real token.
        tok.pad_token = candidates[0] if candidates else PAD_TOKEN
        if not candidates:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = padding_side
    return tok


def configure_dropout(config, dropout: float | None) -> None:
    """Sets every dropout probability of an HF config (names differ per family) to `dropout`."""
    if dropout is None:
        return
    for key, value in config.to_dict().items():
        # Some config.json files write a probability as an int (`"attention_dropout": 0`).
        if isinstance(value, (int, float)) and not isinstance(value, bool) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, dropout)


def load_model(name_or_path: str, tokenizer, *, head: str = "causal_lm", dtype: torch.dtype = torch.float32,
               dropout: float | None = None, gradient_checkpointing: bool = False, zero3_config: dict | None = None,
               trust_remote_code: bool = False):
    """An HF model for training: `head` is "causal_lm" or "score" (a scalar head: reward model or critic).

    A "score" model loads from a causal-LM checkpoint too (the head is then freshly initialised).
    `zero3_config` (a ZeRO-3 DeepSpeed config) partitions the weights while loading, so each rank holds only
    its shard in memory instead of a full copy (DeepSpeed-Chat loaded full checkpoints on every rank).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = model_location(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise OSError(f"cannot load a model config from {name_or_path!r}: {e}") from e
    except ValueError as e:
        raise _remote_code_error(name_or_path, e) from None
    configure_dropout(config, dropout)
    if head == "causal_lm":
        cls = AutoModelForCausalLM
    elif head == "score":
        cls, config.num_labels = AutoModelForSequenceClassification, 1
    else:
        raise ValueError(f"head must be causal_lm or score, got {head!r}")
    zero3 = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(zero3_config)  # must stay alive while loading: transformers holds a weakref
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                          trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise _remote_code_error(name_or_path, e) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    # Set after construction: an added pad id is out of range of the checkpoint's embedding (its padding_idx).
    model.config.pad_token_id = tokenizer.pad_token_id
    if head == "score" and any(k.startswith("score.") for k in info["missing_keys"]):
        # A fresh head: std 1/sqrt(d+1) keeps initial scores O(1) (lm-human-preference-details' reward head).
        _init_head(model.score.weight, 1.0 / (model.config.hidden_size + 1) ** 0.5, partitioned=zero3 is not None)
    del zero3
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


@torch.no_grad()
def _init_head(weight: torch.Tensor, std: float, partitioned: bool) -> None:
    if not partitioned:
        weight.normal_(0.0, std)
        return
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
        if dist.get_rank() == 0:
            weight.normal_(0.0, std)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, the stack of transformer blocks): the ModuleList holding the most parameters
    (`model.layers`, `transformer.h`, ...); ZeRO-3-partitioned and meta-device parameters count by their full size."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    return max(lists, key=lambda item: sum(getattr(p, "ds_numel", p.numel()) for p in item[1].parameters()))


def lora_target_modules(model, module_name: str | None) -> list[str]:
    """Names of the Linear layers that get LoRA: those whose name contains `module_name` (DeepSpeed-Chat's
    substring rule; several substrings separated by commas select the union, e.g. the last two blocks'
    "model.layers.28.,model.layers.29."), or with None every one inside the transformer blocks
    (`decoder_layers`; not OPT's project_in/project_out, which sit outside them). Output heads never do."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's Linear

    blocks = decoder_layers(model)[0] + "." if module_name is None else None
    parts = [m for m in module_name.split(",") if m] if module_name is not None else []
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or name.split(".")[-1] in HEAD_NAMES:
            continue
        if any(m in name for m in parts) if module_name is not None else name.startswith(blocks):
            names.append(name)
    if not names:
        where = f"--lora_module_name {module_name!r}" if module_name else "the model"
        raise ValueError(f"LoRA: no Linear layer matches {where}; layer names look like "
                         f"{[n for n, _ in model.named_modules()][1:6]}")
    return names


def add_lora(model, *, dim: int, alpha: float | None, dropout: float, module_name: str | None,
             only_optimize_lora: bool, head: str = "causal_lm", init: str = "dschat"):
    """Wraps `model` with peft LoRA adapters that train as DeepSpeed-Chat's do.

    Scale `alpha / dim` (None: DeepSpeed-Chat's 1/dim, peft lora_alpha = 1). B starts at zero; with
    init="dschat" A starts uniform in +-1/sqrt(dim), DeepSpeed-Chat's kaiming_uniform(a=sqrt(5)) of its (in x dim)
    matrix, whose fan-in is dim; init="peft" keeps peft's +-1/sqrt(in_features) (sqrt(in/dim) times smaller). Without
    `only_optimize_lora` the wrapped layers' weights are frozen and every other parameter trains (their biases
    included), as DeepSpeed-Chat does; with it only the adapters train. A scalar head always trains."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, module_name)
    config = LoraConfig(r=dim, lora_alpha=1.0 if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=targets, modules_to_save=["score"] if head == "score" else None)
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    # Adapters in the base weights' dtype (peft would upcast them to fp32): ZeRO-3 needs one dtype among the
    # trained tensors, and DeepSpeed's bf16/fp16 optimizers keep fp32 master copies anyway.
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if init not in ("dschat", "peft"):
        raise ValueError(f"--lora_init must be dschat or peft, got {init!r}")
    bound = 1.0 / dim ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name and init == "dschat":
                p.uniform_(-bound, bound)
            elif (not only_optimize_lora and "lora_" not in name and not name.endswith(".base_layer.weight")
                  and ".original_module." not in name):  # modules_to_save's unused copy of the head
                p.requires_grad_(True)
    return model


_LORA_KEY = re.compile(r"^(?P<prefix>.*)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float, conv1d: bool = False) -> dict:
    """A peft model's state dict -> the plain model's, with W + scaling * B @ A folded into each base weight.

    Pure (works on ZeRO-3 consolidated dicts with no model at hand). Keys lose peft's `base_model.model.`
    prefix, `.base_layer` and the `modules_to_save` wrapper. conv1d: GPT-2 stores weights transposed.
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if m:
            lora.setdefault(m["prefix"], {})[m["ab"]] = value
            continue
        if ".original_module." in key:
            continue  # modules_to_save keeps a frozen copy; the trained one is under modules_to_save
        out[_plain_key(key)] = value
    for prefix, ab in lora.items():
        key = _plain_key(prefix + ".weight")
        delta = (ab["B"].float() @ ab["A"].float()) * scaling
        base = out[key]
        out[key] = (base.float() + (delta.T if conv1d else delta)).to(base.dtype)
    return out


def _plain_key(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
