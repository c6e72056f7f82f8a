"""Shared fixtures: a tokenizer trained in-process and tiny random models of each supported family.

Nothing here touches the network. `tiny_model_dir(family)` saves a model + tokenizer folder that every
entry point can load by path, exactly as a user's hub model would be loaded.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# The deepspeed launcher run by this interpreter (the 2-rank tests; the `deepspeed` script on PATH may not be ours).
DEEPSPEED_LAUNCHER = (sys.executable, "-m", "deepspeed.launcher.runner")
# The HH-RLHF sample ships with the package (training/data/bundled), so tests never depend on ../shared.
HH_RLHF = REPO / "training" / "data" / "bundled" / "hh_rlhf_harmless_base.jsonl.gz"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ("llama", "opt", "gpt2", "qwen2", "gpt_neox", "bloom")


def _corpus() -> list[str]:
    lines = []
    if HH_RLHF.exists():
        with gzip.open(HH_RLHF, "rt") as f:
            for i, line in enumerate(f):
                if i >= 400:
                    break
                lines.append(json.loads(line)["chosen"])
    lines += ["Human: hello there Assistant: hi! how can I help?", "The quick brown fox jumps over the lazy dog."] * 5
    return lines


def build_tokenizer(chat_template: bool = True, pad: bool = False, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a little real text.

    chat_template=True gives a ChatML template with eos `<|im_end|>` (like SmolLM2); False gives a plain
    tokenizer with eos `</s>`, no template (like OPT/GPT-2). `pad=False` leaves no pad token, so the
    loader's pad policy is exercised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    eos = "<|im_end|>" if chat_template else "</s>"
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token="<|endoftext|>",
                                 unk_token="<|endoftext|>", pad_token="<pad>" if pad else None)
    if chat_template:
        hf.chat_template = CHATML
    return hf


def tiny_config(family: str, vocab_size: int, **overrides):
    import transformers as tf

    common = dict(vocab_size=vocab_size, **overrides)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=512, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=512, **common)
    if family == "bloom":
        return tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    raise ValueError(family)


def save_tiny_model(path: Path, family: str = "llama", chat_template: bool = True, seed: int = 0,
                    head: str = "causal_lm") -> Path:
    """Writes a tiny random `family` model plus tokenizer to `path` and returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = build_tokenizer(chat_template=chat_template)
    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if head == "causal_lm":
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def plain_tokenizer():
    return build_tokenizer(chat_template=False)


@pytest.fixture
def pad_tokenizer(tokenizer):
    """The session ChatML tokenizer, copied, with `<pad>` as its pad token."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = "<pad>"
    return tok


@pytest.fixture
def examples():
    """rows of (prompt text, chosen, rejected) -> a normalised Dataset, as the data layer hands it to a step."""
    from datasets import Dataset

    from chatrlhf.training.data.sources import example_features

    def make(rows):
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p, _, _ in rows],
                                  "chosen": [c for _, c, _ in rows], "rejected": [r for _, _, r in rows],
                                  "metadata": [None] * len(rows)},
                                 features=example_features())
    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(family="llama", chat_template=True)` -> a saved tiny model folder (cached per session)."""
    cache: dict = {}

    def make(family: str = "llama", chat_template: bool = True, head: str = "causal_lm") -> Path:
        key = (family, chat_template, head)
        if key not in cache:
            cache[key] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, chat_template, head=head)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hh_rlhf_path() -> Path:
    if not HH_RLHF.exists():
        pytest.skip(f"real data not found at {HH_RLHF}")
    return HH_RLHF


@pytest.fixture(scope="session")
def hh_rlhf_sample(hh_rlhf_path):
    """`hh_rlhf_sample(n, directory)`: the first `n` real HH-RLHF pairs as a local JSONL file, as a user's own
    file would be."""

    def write(n: int, directory: Path) -> Path:
        path = Path(directory) / f"hh{n}.jsonl"
        with gzip.open(hh_rlhf_path, "rt") as f, path.open("w") as out:
            out.writelines(line for _, line in zip(range(n), f))
        return path

    return write


# What a run in this process may have set (an in-process step makes it a world of one): a child given these would
# join, or collide with, this process's group.
PROCESS_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def lone_process():
    """`lone_process(args, timeout=300)`: `python *args` as a process of its own (none of this process's
    process-group variables, no hub); returns the CompletedProcess."""
    import subprocess

    def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                              timeout=timeout)

    return run


@pytest.fixture(scope="session")
def deepspeed_launch():
    """`deepspeed_launch(target, args, num_ranks=2, timeout=600)`: runs the `deepspeed` launcher on this machine;
    `target` is a module (`--module`) or, when it ends in .py, a script path.

    Returns the CompletedProcess; raises with the tail of the output when the run fails.
    """
    import importlib.util
    import socket
    import subprocess

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")

    def launch(target: str, args: list[str], num_ranks: int = 2, timeout: int = 600, cwd: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # The launcher as a module of this interpreter: the `deepspeed` on PATH may be another Python's script or a
        # shell shim (pyenv), and the launcher starts the ranks with the interpreter it runs under.
        cmd = [*DEEPSPEED_LAUNCHER, "--num_gpus", str(num_ranks), "--master_port", str(port),
               *([target] if target.endswith(".py") else ["--module", target]), *map(str, args)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-6000:]
            raise AssertionError(f"deepspeed launch failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
        return proc

    return launch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models gain
    nothing from intra-op threads, and on a shared 2-core machine they oversubscribe it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
