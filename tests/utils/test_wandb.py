"""--report_to wandb: the JSONL's metric names, the resolved config and the sample answers, in an offline run."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from chatrlhf.utils.logging import MetricsLogger, read_metrics

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'chatrlhf[wandb]')")


def wandb_records(run_dir: Path):
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each record chunk behind a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # block padding
            pos += left - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "chatrlhf-test")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def run_contents(out: Path, timeout: float = 120.0):
    """(run folder, history rows, config) of the one offline run under out/wandb, once its exit record is written
    (wandb's service process may still be writing the file when finish() has returned)."""
    import time

    run_dir = next((out / "wandb").glob("offline-run-*"))
    deadline = time.time() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_dir)) and time.time() < deadline:
        time.sleep(0.5)
    history, config = [], {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    return run_dir, history, config


def test_an_offline_run_has_the_metrics_config_and_samples(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    out = tmp_path / "step3"
    out.mkdir()
    (out / "chatrlhf_config.yaml").write_text("actor_lora_dim: 8\ndata_path:\n- hh-rlhf-demo\n")
    logger = MetricsLogger(out, report_to="wandb")
    logger.log(0, {"eval/score_mean": 0.25})
    logger.log(1, {"train/loss": 1.5, "objective/kl": 0.125})
    logger.samples(1, [{"prompt": "hi", "answer": "hello", "score": 0.5}])
    logger.samples(2, [{"prompt": "2+2?", "answer": "4", "score": 1.0}])
    logger.close()

    run_dir, history, config = run_contents(out)
    # The JSONL and the run carry the same metric names and values at the same steps.
    for line in read_metrics(out):
        step = next(h for h in history if h["_step"] == line["step"] and set(line) - {"step"} <= set(h))
        assert all(step[k] == v for k, v in line.items() if k != "step")
    assert config["actor_lora_dim"] == 8 and config["data_path"] == ["hh-rlhf-demo"]
    # The samples table holds every answer so far (the last one logged has both rows).
    tables = sorted((run_dir / "files" / "media" / "table").glob("samples_*.table.json"), key=lambda p: p.stat().st_mtime)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "prompt", "answer", "score"]
    assert last["data"] == [[1, "hi", "hello", 0.5], [2, "2+2?", "4", 1.0]]
    assert [json.loads(line)["answer"] for line in (out / "samples.jsonl").read_text().splitlines()] == ["hello", "4"]


def test_a_training_step_reports_to_wandb(monkeypatch, tmp_path, tiny_model_dir, hh_rlhf_sample):
    from chatrlhf.training.step1_sft import main as sft_main
    from chatrlhf.training.step1_sft.config import SFTConfig
    from chatrlhf.utils.config import from_flat

    offline(monkeypatch, tmp_path)
    out = tmp_path / "sft"
    data = hh_rlhf_sample(24, tmp_path)
    cfg = from_flat(SFTConfig, dict(model_name_or_path=str(tiny_model_dir("llama")), data_path=[str(data)],
                                    data_split="10,0,0", dtype="fp32", output_dir=str(out),
                                    data_output_path=str(tmp_path / "cache"), max_seq_len=64,
                                    per_device_train_batch_size=4, per_device_eval_batch_size=4, eval_iters=2,
                                    max_steps=2, report_to="wandb", skip_malformed=True))
    sft_main.run(cfg)
    _, history, config = run_contents(out)
    assert config["report_to"] == "wandb" and config["max_steps"] == 2
    logged = {k for h in history for k in h}
    assert {"train/loss", "eval/loss"} <= logged
    assert {k for line in read_metrics(out) for k in line} - {"step"} <= logged


def test_report_to_checks_its_value(tmp_path):
    with pytest.raises(ValueError, match="--report_to"):
        MetricsLogger(tmp_path, report_to="mlflow")
