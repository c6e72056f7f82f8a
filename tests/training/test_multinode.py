"""Multi-node, exercised: DeepSpeed's multi-node launcher across two simulated nodes on this machine.

Each "node" is a `deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1` process with one rank
(H names two hosts of one slot each; with --no_ssh nothing connects to them, every node runs its own launcher).
The step main, run from DeepSpeed-Chat's folder name as its scripts do, and `train.py --deployment-type
multi_node --no-ssh` must train the same model as a single-node 2-rank run: same losses, same weights.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf.utils.logging import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STEP1 = REPO / "training" / "step1_supervised_finetuning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "PYTHONPATH")}
    return dict(keep, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def run_nodes(commands: list[list[str]], cwd: Path, logs: Path, timeout: int = 900) -> None:
    """Starts every node's command at once in `cwd` (they meet at the master port) and waits for all of them;
    node i's output goes to logs/node{i}.log."""
    logs = [logs / f"node{i}.log" for i in range(len(commands))]
    import time

    procs = [subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True) for cmd, log in zip(commands, logs)]
    deadline = time.time() + timeout
    try:
        # A node that fails leaves the others waiting for it at the rendezvous: stop them then, not at the timeout.
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.time() < deadline:
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)  # the node's launcher and its ranks
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{log} (exit {p.returncode}):\n{log.read_text()[-6000:]}"


def flags(model: Path, out: Path, data: Path, cache: Path) -> list[str]:
    values = dict(model_name_or_path=model, data_path=data, data_split="10,0,0", dtype="fp32", output_dir=out,
                  data_output_path=cache, max_seq_len=64, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                  learning_rate=3e-3, lr_scheduler_type="constant", eval_iters=2, max_steps=3, seed=7,
                  skip_malformed=True, zero_stage=2)
    return [w for k, v in values.items() for w in (f"--{k}", str(v))]


def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("node0 slots=1\nnode1 slots=1\n")
    return path


def losses(out: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]


def assert_same_model(a: Path, b: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 400, (2, 12))
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(a)(input_ids=ids).logits
        lb = AutoModelForCausalLM.from_pretrained(b)(input_ids=ids).logits
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, hh_rlhf_sample):
    root = tmp_path_factory.mktemp("multinode")
    return root, tiny_model_dir("llama"), hh_rlhf_sample(48, root)


@pytest.fixture(scope="module")
def one_node(setup, deepspeed_launch):
    """The reference: one node, 2 ranks (`deepspeed --num_gpus 2 main.py ...`)."""
    root, model, data = setup
    out = root / "one_node"
    deepspeed_launch(str(STEP1 / "main.py"), flags(model, out, data, root / "cache"), num_ranks=2, cwd=str(STEP1))
    assert len(losses(out)) == 3
    return out


def test_two_nodes_without_ssh_train_the_model_of_one_node(setup, one_node):
    root, model, data = setup
    out, hosts, port = root / "two_nodes", hostfile(root), free_port()
    commands = [[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(rank),
                 "--master_addr", "127.0.0.1", "--master_port", str(port), "main.py",
                 *flags(model, out, data, root / f"cache{rank}")] for rank in (0, 1)]
    run_nodes(commands, STEP1, root)
    assert losses(out) == pytest.approx(losses(one_node), abs=2e-4)
    assert_same_model(out, one_node)


def test_train_py_multi_node_without_ssh_trains_the_model_of_one_node(setup, one_node):
    root, model, data = setup
    out, hosts, port = root / "pipeline", hostfile(root), free_port()
    recipe = root / "recipe.yaml"
    recipe.write_text("description: everything comes from --step1-args\n")
    step1 = flags(model, "UNUSED", data, root / "cache_pipeline")
    step1 = " ".join(w for w in step1[step1.index("--data_path"):] if w != "--output_dir" and w != "UNUSED")
    commands = [[sys.executable, str(REPO / "train.py"), "--deployment-type", "multi_node", "--hostfile", str(hosts),
                 "--no-ssh", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                 "--num-gpus", "1", "--step", "1", "--actor-model", str(model), "--reward-model", str(model),
                 "--recipe", str(recipe), "--output-dir", str(out), "--report-samples", "0", "--step1-args", step1]
                for rank in (0, 1)]
    run_nodes(commands, REPO, root)
    assert losses(out / "step1_sft") == pytest.approx(losses(one_node), abs=2e-4)
    assert_same_model(out / "step1_sft", one_node)
    assert (out / "report.md").is_file()  # written by node 0 only
    log = (root / "node1.log").read_text()
    assert "node 0 writes the report" in log and "--no_ssh" in (out / "logs" / "step1.log").read_text()
