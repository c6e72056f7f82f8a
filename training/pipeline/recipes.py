"""Recipes: YAML files of flag values per step, picked by model size and deployment type.

A recipe file (`recipes/<size>_<deployment>.yaml`, shipped with the package) has up to five sections, each a
mapping of flag names (as in each step's `--help`) to values (`step2_dpo`: step 2 with `--step2-method dpo`):

    common: {dtype: bf16}          # every step
    step1: {per_device_train_batch_size: 8, ...}
    step2: {...}                   # the reward model
    step2_dpo: {...}               # DPO, when it replaces steps 2-3
    step3: {...}

The size bucket comes from the actor's parameter count, read from its config alone (the model is built on the
meta device: no weights are loaded). Any causal LM works; the buckets only choose batch sizes, ZeRO stages and
LoRA. `--recipe FILE` picks a file by hand.
"""
from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

from chatrlhf.utils.config import read_yaml

logger = logging.getLogger(__name__)

DEPLOYMENTS = ("single_gpu", "single_node", "multi_node", "cpu")
SECTIONS = ("common", "step1", "step2", "step2_dpo", "step3")
# (bucket, largest parameter count it takes); the last bucket takes everything bigger.
SIZE_BUCKETS = (("small", 500e6), ("1b", 3e9), ("7b", float("inf")))
# A recipe value "{last_block}" becomes the name prefix of the model's last transformer block (e.g.
# "model.layers.29."), "{last_blocks:N}" the prefixes of its last N, comma-separated (a union for
# --lora_module_name), and "{all_blocks}" the prefix of the whole stack ("model.layers."), so a recipe can put LoRA
# there for any family.
LAST_BLOCK = "{last_block}"
ALL_BLOCKS = "{all_blocks}"
LAST_BLOCKS = re.compile(r"\{last_blocks:(\d+)\}")


def recipe_dir() -> Path:
    return Path(str(resources.files("chatrlhf.training.pipeline") / "recipes"))


def size_bucket(num_params: float) -> str:
    return next(name for name, limit in SIZE_BUCKETS if num_params <= limit)


def recipe_path(num_params: float, deployment: str) -> Path:
    """The packaged recipe for this size and deployment; the nearest smaller bucket's when there is none."""
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"unknown deployment type {deployment!r}; accepted: {', '.join(DEPLOYMENTS)}")
    names = [name for name, _ in SIZE_BUCKETS]
    wanted = names.index(size_bucket(num_params))
    for bucket in reversed(names[:wanted + 1]):
        path = recipe_dir() / f"{bucket}_{deployment}.yaml"
        if path.is_file():
            if bucket != names[wanted]:
                logger.warning("no %s recipe for %s; using %s (raise the ZeRO stage or add --offload if memory runs "
                               "out)", names[wanted], deployment, path.name)
            return path
    raise FileNotFoundError(f"no recipe for {deployment} under {recipe_dir()}")


def read_recipe(path: str | Path) -> dict[str, dict]:
    """{section: {flag: value}} from a recipe file; unknown sections are errors."""
    data = read_yaml(path, option="--recipe")
    unknown = sorted(set(data) - set(SECTIONS) - {"description"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; accepted: {', '.join(SECTIONS)}")
    out = {}
    for section in SECTIONS:
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must map flag names to values")
        out[section] = {str(k).lstrip("-"): v for k, v in values.items()}
    return out


def describe(path: str | Path) -> str:
    return str(read_yaml(path, option="--recipe").get("description", "")).strip()


def model_summary(name_or_path: str) -> dict:
    """{"name", "num_params", "last_block"} of a causal LM, from its config only.

    Raises OSError when the config cannot be read (a wrong path or hub id, or no network for an uncached one).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from chatrlhf.utils.smollm2 import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read the model config of {name_or_path!r}: {e}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - an exotic config: fall back to the usual estimate
        logger.warning("could not build %s on the meta device (%s); estimating its size", name_or_path, e)
        return {"name": name_or_path, "num_params": _estimate_params(config), "last_block": None}
    return {"name": name_or_path, "num_params": sum(p.numel() for p in model.parameters()),
            "last_block": _last_block(model)}


def _estimate_params(config) -> float:
    """12 L h^2 + V h: the transformer blocks plus the embeddings."""
    def get(*keys):
        return next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)), 0)

    hidden, layers = get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer", "num_layers")
    return 12 * layers * hidden ** 2 + get("vocab_size") * hidden


def _last_block(model) -> str | None:
    """"model.layers.29." for the last of the model's transformer blocks."""
    from chatrlhf.utils.models import decoder_layers

    try:
        name, blocks = decoder_layers(model)
    except ValueError:
        return None
    return f"{name}.{len(blocks) - 1}."


def fill_placeholders(values: dict, summary: dict, where: str) -> dict:
    """Replaces "{last_block}", "{last_blocks:N}" and "{all_blocks}" in string values; a recipe that needs them for a
    model without blocks is an error."""
    out = {}
    for key, value in values.items():
        if isinstance(value, str) and (LAST_BLOCK in value or ALL_BLOCKS in value or LAST_BLOCKS.search(value)):
            last = summary.get("last_block")
            if not last:
                raise ValueError(f"{where}: {key}: {value} needs a model with a list of transformer blocks; "
                                 f"override --{key}")
            stack, index = last.rstrip(".").rsplit(".", 1)  # "model.layers", "29"
            value = value.replace(LAST_BLOCK, last).replace(ALL_BLOCKS, stack + ".")
            value = LAST_BLOCKS.sub(lambda m: ",".join(
                f"{stack}.{i}." for i in range(max(0, int(index) - int(m.group(1)) + 1), int(index) + 1)), value)
        out[key] = value
    return out


def human_size(num_params: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num_params >= scale:
            return f"{num_params / scale:.{1 if num_params < 10 * scale else 0}f}{unit}"
    return str(int(num_params))


def looks_local(name: str) -> bool:
    """True for names that can only be a local folder (a hub id is `name` or `org/name`)."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1
            or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name))
