"""Resume only what was asked: a rerun with settings that change what is trained is refused with the differences,
harmless changes are allowed and logged, --resume_with_changes and --resume false are the ways out; and one job per
output directory, by a lock that a crashed run does not leave behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from chatrlhf.training import checkpoint
from chatrlhf.training.step1_sft import main as sft_main
from chatrlhf.training.step1_sft.config import SFTConfig
from chatrlhf.utils.config import from_flat
from chatrlhf.utils.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, hh_rlhf_sample):
    folder = tmp_path_factory.mktemp("data")
    return hh_rlhf_sample(40, folder), hh_rlhf_sample(30, folder)


def flags(model, out, data_file, cache, **extra) -> dict:
    f = dict(model_name_or_path=str(model), data_path=[str(data_file)], data_split="10,0,0", dtype="fp32",
             output_dir=str(out), data_output_path=str(cache), max_seq_len=48, per_device_train_batch_size=4,
             learning_rate=3e-3, lr_scheduler_type="constant", eval_iters=1, seed=7, skip_malformed=True,
             max_steps=4, save_interval=2)
    f.update(extra)
    return f


def test_meaningful_and_harmless_flags():
    from chatrlhf.training import resume

    for flag in ("learning_rate", "data_path", "seed", "zero_stage", "actor_lora_dim", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "max_steps", "lr_scheduler_type", "model_name_or_path", "dtype"):
        assert not resume.allowed(flag), flag
    for flag in ("eval_interval", "log_interval", "save_interval", "tensorboard_path", "output_dir",
                 "critic_gradient_checkpointing", "hang_timeout"):
        assert resume.allowed(flag), flag
    saved = {"learning_rate": 1e-3, "data_path": ["a.jsonl"], "eval_interval": 0}
    now = {"learning_rate": 0.001, "data_path": ["b.jsonl"], "eval_interval": 5, "hang_timeout": 1800.0}
    assert resume.differences(saved, now, {"hang_timeout": 1800.0}) == {"data_path": (["a.jsonl"], ["b.jsonl"]),
                                                                        "eval_interval": (0, 5)}


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(tiny_model_dir, data, tmp_path, caplog):
    from chatrlhf.training.resume import ResumeRefused

    model, (first, second) = tiny_model_dir("llama"), data
    out = tmp_path / "run"
    sft_main.run(from_flat(SFTConfig, flags(model, out, first, tmp_path / "c")))
    assert checkpoint.latest(out).name == "step_2"
    final = (out / "model.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    top_config = (out / "chatrlhf_config.yaml").read_text()

    with pytest.raises(ResumeRefused) as e:
        sft_main.run(from_flat(SFTConfig, flags(model, out, second, tmp_path / "c", learning_rate=1e-4)))
    message = str(e.value)
    for part in ("--learning_rate: 0.003 (checkpoint) -> 0.0001 (now)", "--data_path", str(first), str(second),
                 "--resume false", "--output_dir", "--resume_with_changes"):
        assert part in message, (part, message)
    assert "eval_interval" not in message
    # Refused before anything was written: the final model, the metrics and the saved config are the old run's.
    assert (out / "model.safetensors").read_bytes() == final
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (out / "chatrlhf_config.yaml").read_text() == top_config

    # Harmless changes resume (logged); the meaningful ones only with --resume_with_changes.
    with caplog.at_level("INFO"):
        sft_main.run(from_flat(SFTConfig, flags(model, out, first, tmp_path / "c", eval_interval=1, log_interval=2)))
    assert "--eval_interval changed: 0 -> 1" in caplog.text
    resumed_steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert resumed_steps == [1, 2, 3, 4, 4]  # resumed at step 2: step 4 again (3 not logged, --log_interval 2)
    with caplog.at_level("WARNING"):
        sft_main.run(from_flat(SFTConfig, flags(model, out, first, tmp_path / "c", learning_rate=1e-4,
                                                resume_with_changes=True)))
    assert "resuming" in caplog.text and "--learning_rate 0.0001" in caplog.text
    sft_main.run(from_flat(SFTConfig, flags(model, out, second, tmp_path / "c", learning_rate=1e-4, resume=False)))
    assert [m["step"] for m in read_metrics(out)][-6:-4] == [0, 1]  # from scratch: evaluated before step 1


def _hold_lock(directory, ready, name=None) -> subprocess.Popen:
    """Another process that takes `directory`'s lock and keeps it until killed."""
    name_arg = f", {name!r}" if name else ""
    code = (f"from chatrlhf.utils import lock; import time; lock.acquire({str(directory)!r}{name_arg}); "
            f"open({str(ready)!r}, 'w').write('1'); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, "the lock holder did not start"
        time.sleep(0.1)
    return proc


def test_a_second_job_in_one_output_dir_is_refused_and_a_crashed_one_leaves_no_lock(tiny_model_dir, data,
                                                                                    tmp_path):
    from chatrlhf.utils.lock import DirectoryLocked

    out = tmp_path / "busy"
    holder = _hold_lock(out, tmp_path / "ready")
    try:
        cfg = from_flat(SFTConfig, flags(tiny_model_dir("llama"), out, data[0], tmp_path / "c", max_steps=1,
                                         save_interval=0))
        with pytest.raises(DirectoryLocked) as e:
            sft_main.run(cfg)
        assert f"pid {holder.pid}" in str(e.value) and "in use by another training run" in str(e.value)
        assert not (out / "metrics.jsonl").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: nothing releases the lock but the kernel
        holder.wait()
    sft_main.run(cfg)  # not stuck
    assert (out / "model.safetensors").exists()


def test_the_pipeline_locks_its_output_root(tiny_model_dir, tmp_path):
    from chatrlhf.training.pipeline.cli import PipelineOptions, run_pipeline
    from chatrlhf.training.pipeline.plan import PlanError
    from chatrlhf.training.pipeline.preflight import PIPELINE_LOCK

    model = str(tiny_model_dir("llama"))
    out = tmp_path / "output"
    opts = PipelineOptions(actor_model=model, reward_model=model, deployment_type="cpu", output_dir=str(out),
                           launcher="inprocess", dry_run=True)
    other = _hold_lock(out, tmp_path / "ready", PIPELINE_LOCK)  # another train.py on the same output root
    try:
        with pytest.raises(PlanError, match=f"in use by another pipeline run \\(pid {other.pid}"):
            run_pipeline(opts)
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait()
    run_pipeline(opts)  # free again once it is gone: the dry run passes
