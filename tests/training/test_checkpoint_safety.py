"""Loading a checkpoint runs no code from it (training/checkpoint.py): every file, DeepSpeed's model, optimizer
and ZeRO states included, is read with torch.load(weights_only=True); a planted pickle payload is refused with
the file named and never runs; RNG states still resume bit for bit."""
from __future__ import annotations

import json
import pickle
import random
import re

import numpy as np
import pytest
import torch

from chatrlhf.training import checkpoint
from chatrlhf.training.checkpoint import UnsafeCheckpointError, install_safe_loading, safe_load
from chatrlhf.training.hybrid_engine import build_engine
from chatrlhf.utils.models import add_lora, load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this opens (creates) `marker`: what a hostile file would do with a worse call."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def zero3_config(tmp_path_factory) -> str:
    """Every parameter partitioned (by default ZeRO-3 keeps the tiny model's small tensors whole)."""
    path = tmp_path_factory.mktemp("ds") / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return str(path)


def make(model_dir, zero_stage: int, dtype: str, lora: bool, zero3_config: str):
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tok, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if lora:
        model = add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=False)
    engine = build_engine(model, zero_stage=zero_stage, dtype=dtype, micro_batch_size=2, learning_rate=1e-2,
                          lr_scheduler_type="linear", num_warmup_steps=1, total_steps=10,
                          user_config_path=zero3_config if zero_stage == 3 else None)
    install_safe_loading(engine.engine)  # what build_engine is to do right after deepspeed.initialize
    return engine, tok


def train_step(engine, tok) -> None:
    batch = tok(["a short training text", "and another"], return_tensors="pt", padding=True)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    engine.train()
    engine.backward(engine(**batch, labels=batch["input_ids"]).loss)
    engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in engine.full_state_dict().items()}


def spy_torch_load(monkeypatch) -> list:
    """Records the weights_only argument of every torch.load call (DeepSpeed's included)."""
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize("zero_stage,dtype,lora", [(0, "fp32", False), (0, "bf16", True), (2, "fp32", True),
                                                   (2, "bf16", False), (3, "fp32", False), (3, "bf16", True)])
def test_deepspeed_checkpoints_load_weights_only_and_resume_exactly(tiny_model_dir, zero3_config, tmp_path,
                                                                    monkeypatch, zero_stage, dtype, lora):
    model_dir = tiny_model_dir("llama")
    a, tok = make(model_dir, zero_stage, dtype, lora, zero3_config)
    train_step(a, tok)
    path = checkpoint.save(tmp_path, 1, {"model": a}, {"step": 1})
    train_step(a, tok)
    expected = weights(a)

    b, _ = make(model_dir, zero_stage, dtype, lora, zero3_config)
    calls = spy_torch_load(monkeypatch)
    assert checkpoint.load(path, {"model": b}) == {"step": 1}
    assert calls and all(w is True for w in calls), calls  # DeepSpeed's own loads say weights_only=False
    monkeypatch.undo()
    train_step(b, tok)  # same weights, optimizer moments and schedule: the same next step
    got = weights(b)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("zero_stage,file", [(0, "mp_rank_00_model_states.pt"),
                                             (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_payload_planted_in_a_deepspeed_file_is_refused_and_never_runs(tiny_model_dir, zero3_config, tmp_path,
                                                                       zero_stage, file):
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(Payload(live))).close()
    assert live.exists()  # the payload is real: plain unpickling runs it

    model_dir = tiny_model_dir("llama")
    a, tok = make(model_dir, zero_stage, "fp32", False, zero3_config)
    train_step(a, tok)
    path = checkpoint.save(tmp_path / "out", 1, {"model": a}, {"step": 1})
    target = path / "model" / file
    state = safe_load(target, deepspeed_types=True)
    marker = tmp_path / "marker"
    state["planted"] = Payload(marker)
    torch.save(state, target)

    b, _ = make(model_dir, zero_stage, "fp32", False, zero3_config)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(target)) + ".*refused"):
        checkpoint.load(path, {"model": b})
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(target))):
        b.load_checkpoint(path, tag="model")  # the engine itself, not only our resume, reads safely
    assert not marker.exists()


def test_payload_planted_in_an_rng_file_is_refused_and_never_runs(tmp_path):
    path = checkpoint.save(tmp_path, 3, {}, {"step": 3})
    rng_file = path / "rng_0.pt"
    state = torch.load(rng_file, weights_only=True)
    marker = tmp_path / "marker"
    state["planted"] = Payload(marker)
    torch.save(state, rng_file)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(rng_file)) + ".*refused"):
        checkpoint.load(path, {})
    assert not marker.exists()


def test_rng_state_loads_weights_only_and_resumes_bit_identically(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Odd numbers of Gaussian draws leave a cached second value in Python's and numpy's generators.
    random.gauss(0, 1)
    np.random.standard_normal()
    path = checkpoint.save(tmp_path, 1, {}, {"step": 1})

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(4).tolist(),
                torch.rand(4).tolist(), torch.randn(2).tolist())

    expected = draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert checkpoint.load(path, {}) == {"step": 1}
    assert draws() == expected
    torch.load(path / "rng_0.pt", weights_only=True)  # plain torch, no allow-list needed


def test_rng_file_of_the_old_numpy_format_is_refused_with_a_way_out(tmp_path):
    path = checkpoint.save(tmp_path, 1, {}, {"step": 1})
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "accelerator": None}, path / "rng_0.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"rng_0\.pt: refused.*delete it to resume"):
        checkpoint.load(path, {})


def test_a_configured_checkpoint_writer_reads_safely_too(tmp_path):
    """DeepSpeed's other engines (fast, decoupled writers) keep their own saving but load through ours."""
    from types import SimpleNamespace

    class OtherWriter:
        def load(self, path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(2), "planted": Payload(marker)}, tmp_path / "states.pt")
    ds_engine = SimpleNamespace(checkpoint_engine=OtherWriter())
    install_safe_loading(ds_engine)
    install_safe_loading(ds_engine)  # idempotent
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(tmp_path / "states.pt"))):
        ds_engine.checkpoint_engine.load(str(tmp_path / "states.pt"), map_location="cpu")
    assert not marker.exists()
