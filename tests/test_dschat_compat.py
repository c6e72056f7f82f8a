"""DeepSpeed-Chat users switch without rewriting their scripts.

- Every command line DeepSpeed-Chat ships (tests/data/dschat/command_lines.json) parses here with DeepSpeed-Chat's
  meaning, from DeepSpeed-Chat's folder name, or is refused with the reason docs/FROM_DSCHAT.md gives.
- One LoRA step with DeepSpeed-Chat's flags equals a step of DeepSpeed-Chat's LoRA rule (scale 1/r, A from
  kaiming over the rank, the wrapped weights frozen, decay on the adapters).
- The start-up notice lists exactly the flags that differ; every one of them is in docs/FROM_DSCHAT.md.
- The shipped training_scripts/ and evaluation_scripts/ pass a dry run (deepspeed and python shimmed on PATH).
- train.py / e2e_rlhf.py: OPT size shorthand, --actor-zero-stage "", DeepSpeed's default hostfile, DeepSpeed-Chat's
  output layout for --step 3.
"""
from __future__ import annotations

import ast
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf.inference.prompt_eval import PromptEvalConfig
from chatrlhf.training import dschat
from chatrlhf.training.pipeline import cli
from chatrlhf.training.pipeline.plan import PlanError
from chatrlhf.training.step1_sft.config import SFTConfig
from chatrlhf.training.step2_reward.config import RewardConfig
from chatrlhf.training.step2_reward.rw_eval import RwEvalConfig
from chatrlhf.training.step3_ppo.config import PPOConfig
from chatrlhf.utils.config import from_flat, parse_config, to_flat

REPO = Path(__file__).resolve().parents[1]
RECORDS = json.loads((REPO / "tests" / "data" / "dschat" / "command_lines.json").read_text())
DOC = (REPO / "docs" / "FROM_DSCHAT.md").read_text()
DPO = (REPO / "training" / "step2_dpo" / "main.py").is_file()

# DeepSpeed-Chat's folder (and file) -> ours: the alias folder's file and the config it parses.
FOLDER = {"step1": "step1_supervised_finetuning", "step2_reward": "step2_reward_model_finetuning",
          "step2_dpo": "step2_dpo_finetuning", "step3": "step3_rlhf_finetuning",
          "prompt_eval": "step1_supervised_finetuning", "rw_eval": "step2_reward_model_finetuning"}
CONFIG = {"step1": SFTConfig, "step2_reward": RewardConfig, "step3": PPOConfig, "prompt_eval": PromptEvalConfig,
          "rw_eval": RwEvalConfig}
TARGET = {"step1": "chatrlhf.training.step1_sft.main", "step2_reward": "chatrlhf.training.step2_reward.main",
          "step2_dpo": "chatrlhf.training.step2_dpo.main", "step3": "chatrlhf.training.step3_ppo.main",
          "prompt_eval": "chatrlhf.inference.prompt_eval", "rw_eval": "chatrlhf.training.step2_reward.rw_eval"}
# The refusals, with the words of their message; docs/FROM_DSCHAT.md gives the same reasons.
REFUSED = {"enable_mixed_precision_lora": "MixZ++", "inference_tp_size": "--inference_tp_size > 1 is not supported"}


def dpo_config():
    from chatrlhf.training.steps import STEPS

    for step in STEPS.values():
        if step.module == "chatrlhf.training.step2_dpo":
            return step.config_class()
    import importlib

    module = importlib.import_module("chatrlhf.training.step2_dpo.config")
    return next(v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "__dataclass_fields__")
                and "dschat" in v.__dataclass_fields__)


def record_id(i: int, r: dict) -> str:
    return f"{i}:{r['step']}:{r['origin'].split(' -> ')[-1].removeprefix('applications/DeepSpeed-Chat/')}"


def expected_refusal(argv: list[str]) -> str | None:
    for flag, words in REFUSED.items():
        if f"--{flag}" in argv:
            value = argv[argv.index(f"--{flag}") + 1] if flag == "inference_tp_size" else None
            if value is None or int(value) > 1:
                return words
    return None


def flag_values(argv: list[str]) -> dict[str, list[str]]:
    """--flag v1 v2 -> {flag: [v1, v2]}; a flag without values -> []."""
    out, key = {}, None
    for word in argv:
        if word.startswith("--"):
            key = word[2:].split("=")[0]
            out[key] = [word.split("=", 1)[1]] if "=" in word else []
        elif key is not None:
            out[key].append(word)
    return out


def parse_refusal(cls, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_config(cls, argv)
    return capsys.readouterr().err


def check_dschat_meaning(step: str, cfg, argv: list[str]) -> None:
    """The DeepSpeed-Chat meaning of what a parsed command line says, where chatrlhf could have said otherwise."""
    given = flag_values(argv)
    flat = to_flat(cfg)
    for flag, values in given.items():
        if flag == "local_rank":
            continue
        assert flag in flat, flag
        if not values:  # store_true in DeepSpeed-Chat
            assert flat[flag] is True, flag
        elif isinstance(flat[flag], list):
            assert [str(v) for v in flat[flag]] == values, flag
        elif isinstance(flat[flag], float):
            assert flat[flag] == float(values[0]), flag
        elif flag not in ("max_steps", "num_train_epochs", "generation_batches"):  # folded into (below)
            assert str(flat[flag]) == values[0], flag
    # LoRA: DeepSpeed-Chat's scale 1/dim and its initialisation unless said otherwise.
    for prefix in ("", "actor_", "critic_"):
        if flat.get(f"{prefix}lora_dim", 0) > 0:
            assert flat[f"{prefix}lora_alpha"] == 1.0 and flat[f"{prefix}lora_init"] == "dschat"
            assert flat[f"{prefix}lora_module_name"] == (given.get(f"{prefix}lora_module_name") or [None])[0]
    if step == "step3":
        # DeepSpeed-Chat's accumulation across rollouts: that many rollouts collected into one optimizer step.
        asked = int(given.get("generation_batches", ["1"])[0])
        per_rollout = flat["per_device_generation_batch_size"] * asked // flat["per_device_training_batch_size"]
        accumulation = flat["gradient_accumulation_steps"]
        expected = asked * (accumulation // math.gcd(per_rollout, accumulation) if per_rollout % accumulation else 1)
        assert flat["generation_batches"] == expected
    if "enable_test_mode" in given:
        stop = int(given["test_stop_step"][0]) if "test_stop_step" in given else 0
        assert flat["num_train_epochs"] == 1 and flat["max_steps"] == stop
    # What DeepSpeed-Chat did with a flag that does something else here is in the start-up notice.
    notice = dschat.notice(step, type(cfg), cfg, argv)
    for g in dschat.GIVEN:
        if g.flag in given and g.flag in flat and (g.programs is None or step in g.programs) and (
                g.applies is None or g.applies(cfg)):
            assert f"--{g.flag}:" in notice
    if "deepspeed" in given and "dtype" not in given and step in dschat.TRAINING:
        assert "--dtype: not given" in notice  # every shipped training line relies on DeepSpeed-Chat's fp16


# ------------------------------------------------------------------------------------------ shipped command lines

@pytest.mark.parametrize("i", [i for i, r in enumerate(RECORDS) if r["step"] != "e2e"],
                         ids=[record_id(i, r) for i, r in enumerate(RECORDS) if r["step"] != "e2e"])
def test_shipped_command_line_parses_with_dschat_meaning_or_is_refused(i, capsys):
    r = RECORDS[i]
    step, argv = r["step"], list(r["argv"])
    # It runs from DeepSpeed-Chat's folder name: the same file name there runs the right chatrlhf module.
    script = REPO / "training" / FOLDER[step] / r["program"]
    assert script.is_file(), script
    assert TARGET[step] in {n.module for n in ast.walk(ast.parse(script.read_text())) if isinstance(n, ast.ImportFrom)}
    if step == "step2_dpo":
        if not DPO:
            pytest.skip("DeepSpeed-Chat's DPO lines need training/step2_dpo, which is not there yet")
        cls = dpo_config()
    else:
        cls = CONFIG[step]
    if r["launcher"].startswith("deepspeed"):
        argv = ["--local_rank=0"] + argv  # what the deepspeed launcher puts in front
    if step == "rw_eval" and argv == ["--model_name_or_path"]:
        # As shipped the path is empty: DeepSpeed-Chat's own argparse refuses it the same way.
        assert "expected one argument" in parse_refusal(cls, argv, capsys)
        cfg = parse_config(cls, argv + ["output/step2_reward"])  # with a path: its built-in pairs
        assert cfg.prompt is None and cfg.input_file is None
        return
    refusal = expected_refusal(argv)
    if refusal:
        err = parse_refusal(cls, argv, capsys)
        assert refusal in err, err
        assert refusal.replace("--", "").split()[0] in DOC
        return
    cfg = parse_config(cls, argv)
    check_dschat_meaning(step, cfg, [a for a in argv if not a.startswith("--local_rank")])
    # A saved config reloads to the same run (the aliases were folded in once).
    assert from_flat(cls, to_flat(cfg)) == cfg


@pytest.mark.parametrize("i", [i for i, r in enumerate(RECORDS) if r["step"] == "e2e"],
                         ids=[record_id(i, r) for i, r in enumerate(RECORDS) if r["step"] == "e2e"])
def test_shipped_e2e_command_line_runs_from_e2e_rlhf_py(i, monkeypatch, tmp_path, capsys):
    argv = RECORDS[i]["argv"]
    assert (REPO / "e2e_rlhf.py").is_file()
    opts = cli.parse_options(cli.e2e_argv(argv))
    cli.dschat_defaults(opts)
    given = flag_values(argv)
    for option in ("actor-model", "reward-model"):
        name = given.get(option, [{"actor-model": "1.3b", "reward-model": "350m"}[option]])[0]
        assert getattr(opts, option.replace("-", "_")) == (name if "/" in name else f"facebook/opt-{name}")
    assert opts.deployment_type == given.get("deployment-type", ["single_gpu"])[0]
    if opts.deployment_type == "multi_node":
        # DeepSpeed-Chat relies on DeepSpeed's default hostfile; refused (with that reason) when it is missing.
        monkeypatch.setattr(cli, "DEFAULT_HOSTFILE", str(tmp_path / "missing"))
        with pytest.raises(PlanError, match="/job/hostfile|missing"):
            cli.check_options(opts)
        assert "/job/hostfile" in DOC
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
        monkeypatch.setattr(cli, "DEFAULT_HOSTFILE", str(hostfile))
        opts = cli.parse_options(cli.e2e_argv(argv))
        cli.dschat_defaults(opts)
        assert opts.hostfile == str(hostfile)
    cli.check_options(opts)
    assert opts.step == [int(s) for s in given.get("step", ["1", "2", "3"])]


def test_every_shipped_line_is_covered():
    steps = {r["step"] for r in RECORDS}
    assert steps == {"step1", "step2_reward", "step2_dpo", "step3", "prompt_eval", "rw_eval", "e2e"}
    assert len(RECORDS) == 125


# ------------------------------------------------------------------------------------------ flags that failed before

def test_dschat_only_flags_parse_with_their_meaning(tmp_path):
    ds = tmp_path / "ds.json"
    cfg = parse_config(SFTConfig, ["--deepscale", "--deepscale_config", str(ds)])
    assert cfg.dschat.deepscale and cfg.engine.deepspeed_config == str(ds)
    with pytest.raises(SystemExit):
        parse_config(SFTConfig, ["--deepscale_config", "a.json", "--deepspeed_config", "b.json"])
    cfg = parse_config(PPOConfig, ["--enable_test_mode", "--test_stop_step", "3", "--preprocessing_num_workers", "4",
                                   "--num_train_epochs", "4"])
    assert (cfg.run.max_steps, cfg.run.num_train_epochs, cfg.dschat.preprocessing_num_workers) == (3, 1, 4)
    cfg = parse_config(PPOConfig, ["--enable_test_mode", "--test_stop_step", "5", "--max_steps", "2"])
    assert cfg.run.max_steps == 2  # the smaller limit wins
    cfg = parse_config(PPOConfig, ["--enable_test_mode"])  # test_stop_step 0: the whole first epoch
    assert (cfg.run.max_steps, cfg.run.num_train_epochs) == (0, 1)
    assert parse_config(PPOConfig, ["--test_stop_step", "5"]).run.max_steps == 0  # only with --enable_test_mode
    # DeepSpeed-Chat's opt/single_gpu step 3: one minibatch per rollout, accumulation over 2 rollouts.
    argv = ["--deepspeed", "--gradient_accumulation_steps", "2"]
    assert parse_config(PPOConfig, argv).ppo.generation_batches == 2
    assert "gradient_accumulation_steps" in notice_flags("step3", PPOConfig, argv)
    cfg = parse_config(RwEvalConfig, ["--model_name_or_path", "m", "--num_padding_at_beginning", "1",
                                      "--add_eot_token"])
    assert cfg.prompt is None and cfg.input_file is None
    cfg = parse_config(PromptEvalConfig, ["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b",
                                          "--num_beams", "1", "--num_beam_groups", "1", "--penalty_alpha", "0.6",
                                          "--top_k", "4", "--num_return_sequences", "1", "--language", "Japanese",
                                          "--add_eot_token"])
    assert (cfg.penalty_alpha, cfg.gen.top_k, cfg.language) == (0.6, 4, "Japanese")


def test_refusals_say_what_to_use_instead(capsys):
    err = parse_refusal(PPOConfig, ["--inference_tp_size", "2"], capsys)
    assert "--unpin_actor_parameters" in err and "--offload" in err
    err = parse_refusal(PPOConfig, ["--enable_mixed_precision_lora"], capsys)
    assert "--only_optimize_lora" in err
    base = ["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b"]
    assert "--num_beams alone" in parse_refusal(PromptEvalConfig, base + ["--num_beam_groups", "2"], capsys)
    assert "--do_sample or --num_beams" in parse_refusal(PromptEvalConfig, base + ["--num_return_sequences", "2"],
                                                         capsys)
    for words in ("inference_tp_size", "enable_mixed_precision_lora", "num_beam_groups"):
        assert f"--{words}" in DOC


# ------------------------------------------------------------------------------------------ the LoRA rule

class DSChatLoRA(torch.nn.Module):
    """DeepSpeed-Chat's LoRA layer as its code describes it: y = x W^T + b + (x R L) / dim, with R (in x dim),
    L (dim x out), W frozen."""

    def __init__(self, linear: torch.nn.Linear, right: torch.Tensor, left: torch.Tensor, scale: float):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        self.lora_right_weight = torch.nn.Parameter(right.clone())
        self.lora_left_weight = torch.nn.Parameter(left.clone())
        self.scale = scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) + (
            x @ self.lora_right_weight @ self.lora_left_weight) * self.scale


def dschat_reference(path, ours, dim: int, scale: float, lr: float, lora_lr: float, weight_decay: float):
    """The tiny model with DeepSpeed-Chat's LoRA layers (starting from our adapters' initial values) and its AdamW
    groups: LoRA at lora_lr with decay, biases and norms without decay."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dropout=0.0, attention_dropout=0.0)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and "decoder.layers." in name:
            a = start[f"base_model.model.{name}.lora_A.default.weight"]  # (dim, in)
            b = start[f"base_model.model.{name}.lora_B.default.weight"]  # (out, dim)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, DSChatLoRA(module, a.T, b.T, scale))
    no_decay = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")
    groups = {"decay": [], "lora": [], "no_decay": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups["no_decay" if any(k in n for k in no_decay) else "lora" if "lora_" in n else "decay"].append(p)
    optimizer = torch.optim.AdamW([{"params": groups["decay"], "weight_decay": weight_decay},
                                   {"params": groups["lora"], "weight_decay": weight_decay, "lr": lora_lr},
                                   {"params": groups["no_decay"], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return model, optimizer


def test_one_dschat_lora_step_is_dschat_lora_rule(tiny_model_dir):
    from chatrlhf.training.builders import build_trained_model
    from chatrlhf.utils.models import load_tokenizer

    path = str(tiny_model_dir("opt", chat_template=False))
    dim, lr, lora_lr, wd = 8, 1e-3, 5e-3, 0.1
    # A DeepSpeed-Chat step-1 LoRA line (opt/single_node/run_1.3b_lora.sh's flags), without --only_optimize_lora.
    cfg = parse_config(SFTConfig, ["--deepspeed", "--model_name_or_path", path, "--lora_dim", str(dim),
                                   "--lora_module_name", "decoder.layers.", "--learning_rate", str(lr),
                                   "--lora_learning_rate", str(lora_lr), "--weight_decay", str(wd), "--dropout", "0.0",
                                   "--lr_scheduler_type", "constant", "--dtype", "fp32"])
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    engine = build_trained_model(cfg.model, cfg.optim, cfg.engine, tok, head="causal_lm", micro_batch_size=2,
                                 total_steps=10)
    ours = engine.module
    assert ours.get_submodule("base_model.model.model.decoder.layers.0.self_attn.q_proj").scaling["default"] == 1 / dim
    enc = tok(["Human: hello there Assistant: hi! how can I help?", "The quick brown fox jumps."],
              return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    ref, optimizer = dschat_reference(path, ours, dim, 1 / dim, lr, lora_lr, wd)
    too_strong, optimizer_2 = dschat_reference(path, ours, dim, 2.0, lr, lora_lr, wd)  # peft's usual alpha = 2 x dim

    for model, opt in ((ref, optimizer), (too_strong, optimizer_2)):
        model.train()
        model(**enc, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)  # DeepSpeed-Chat's
        opt.step()
    engine.train()
    engine.backward(engine(**enc, labels=labels).loss)
    engine.step()

    ids = torch.randint(4, len(tok), (2, 10))
    with torch.no_grad():
        ours.eval(), ref.eval(), too_strong.eval()
        got, want, other = ours(input_ids=ids).logits, ref(input_ids=ids).logits, too_strong(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (got - other).abs().max() > 100 * (got - want).abs().max() + 1e-4  # the scale is what is tested
    # The wrapped weights did not move; their biases did (DeepSpeed-Chat freezes only the weight).
    base = dict(ref.named_parameters())
    q = ours.get_submodule("base_model.model.model.decoder.layers.0.self_attn.q_proj")
    torch.testing.assert_close(q.base_layer.weight, base["model.decoder.layers.0.self_attn.q_proj.weight"])
    assert not q.base_layer.weight.requires_grad and q.base_layer.bias.requires_grad


# ------------------------------------------------------------------------------------------ the notice

def notice_flags(program, cls, argv) -> set[str]:
    cfg = parse_config(cls, argv)
    return {flag for flag, _ in dschat.differences(program, cls, cfg, dschat.given_flags(cls, argv))}


def test_notice_lists_exactly_the_flags_that_differ():
    common = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o",
              "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-5"]
    # A DeepSpeed-Chat line (--deepspeed): what it gives that means something else, and the defaults it relies on.
    assert notice_flags("step1", SFTConfig, ["--deepspeed", "--lora_dim", "8", "--add_eot_token"] + common) == {
        "add_eot_token", "dtype", "lora_module_name"}
    assert notice_flags("step1", SFTConfig, ["--deepspeed", "--lora_dim", "8", "--lora_module_name", "layers.",
                                             "--dtype", "fp16"] + common) == set()
    # Not a DeepSpeed-Chat line: only what it gives.
    assert notice_flags("step1", SFTConfig, ["--add_eot_token", "--lora_dim", "8"]) == {"add_eot_token"}
    assert notice_flags("step1", SFTConfig, []) == set()
    assert notice_flags("step2_reward", RewardConfig, ["--deepspeed", "--num_padding_at_beginning", "1"] + common) == {
        "num_padding_at_beginning", "dtype", "eval_interval"}
    step3 = ["--deepspeed", "--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--data_path", "d",
             "--output_dir", "o", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
             "--num_warmup_steps", "100", "--seed", "1", "--dtype", "bf16", "--enable_hybrid_engine"]
    assert notice_flags("step3", PPOConfig, step3 + ["--actor_lora_dim", "4", "--enable_test_mode", "--test_stop_step",
                                                     "3", "--num_padding_at_beginning", "1", "--align_overflow"]) == {
        "actor_lora_module_name", "enable_test_mode", "num_padding_at_beginning", "align_overflow", "kl_coef"}
    assert notice_flags("step3", PPOConfig, step3[:-1] + ["--kl_coef", "0.1", "--tp_gather_partition_size", "4"]) == {
        "enable_hybrid_engine", "tp_gather_partition_size"}
    assert notice_flags("rw_eval", RwEvalConfig, ["--model_name_or_path", "m", "--num_padding_at_beginning", "1"]) == {
        "num_padding_at_beginning"}
    base = ["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b"]
    assert notice_flags("prompt_eval", PromptEvalConfig, base + ["--top_k", "4", "--num_beams", "1"]) == {"top_k"}
    assert notice_flags("prompt_eval", PromptEvalConfig, base + ["--num_beams", "2", "--add_eot_token"]) == {
        "num_beams", "add_eot_token"}
    assert notice_flags("step3", PPOConfig, ["--top_k", "5"]) == set()  # top_k's notice is prompt_eval's


def test_notice_is_printed_once_by_rank_0_from_main(monkeypatch, capsys):
    from chatrlhf.training.step1_sft import main as sft_main
    from chatrlhf.utils import logging as chat_logging

    monkeypatch.setattr(sft_main, "run", lambda cfg: {})
    argv = ["--deepspeed", "--add_eot_token"]
    with monkeypatch.context() as m:
        m.setattr(chat_logging, "is_main_process", lambda: False)  # another rank
        sft_main.main(argv)
    assert "DeepSpeed-Chat" not in capsys.readouterr().out
    sft_main.main(argv)
    out = capsys.readouterr().out
    assert out.count("DeepSpeed-Chat flag(s) of this run work differently here") == 1
    assert "--add_eot_token:" in out and "--dtype: not given" in out and "docs/FROM_DSCHAT.md" in out


def test_notice_from_a_config_file(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("add_eot_token: true\n")
    assert notice_flags("step1", SFTConfig, ["--config", str(yaml_file)]) == {"add_eot_token"}


def test_every_difference_is_documented_and_real():
    table = DOC[DOC.index("## Flags that differ"):]
    classes = {"step1": SFTConfig, "step2_reward": RewardConfig, "step3": PPOConfig}
    from chatrlhf.utils.config import flag_table

    for d in dschat.DEFAULTS:
        assert f"`--{d.flag}`" in table, d.flag
        ours = [flag_table(classes[p])[d.flag][2] for p in d.programs if p in classes]
        assert any(v != d.dschat for v in ours), f"--{d.flag}: the same default as DeepSpeed-Chat's now"
    for g in dschat.GIVEN:
        assert f"`--{g.flag}`" in table, g.flag


# ------------------------------------------------------------------------------------------ training_scripts

SCRIPTS = sorted((REPO / "training").glob("step*_*/*_scripts/**/*.sh"))
SHIM = """#!/bin/sh
printf '%s\\n' "$(basename "$0")" >> "$ARGV_FILE"
for a in "$@"; do printf '%s\\n' "$a" >> "$ARGV_FILE"; done
printf '\\036\\n' >> "$ARGV_FILE"
"""


def run_shimmed(script: Path, args: list[str], tmp_path: Path, env: dict | None = None) -> list[list[str]]:
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    for name in ("deepspeed", "python"):
        (shims / name).write_text(SHIM)
        (shims / name).chmod(0o755)
    argv_file = tmp_path / "argv.txt"
    argv_file.unlink(missing_ok=True)
    full_env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", ARGV_FILE=str(argv_file), **(env or {}))
    proc = subprocess.run(["bash", str(script.relative_to(script_folder(script))), *args], cwd=script_folder(script),
                          env=full_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = argv_file.read_text().split("\x1e\n")
    return [c.splitlines() for c in calls if c.strip()]


def script_folder(script: Path) -> Path:
    return next(p for p in script.parents if p.parent == REPO / "training")


def test_scripts_exist_for_every_step_family_and_deployment():
    for folder in ("step1_supervised_finetuning", "step2_reward_model_finetuning", "step2_dpo_finetuning",
                   "step3_rlhf_finetuning"):
        for family in ("opt", "llama", "qwen"):
            for deployment in ("single_gpu", "single_node", "multi_node", "cpu"):
                found = list((REPO / "training" / folder / "training_scripts" / family / deployment).glob("run_*.sh"))
                assert found, (folder, family, deployment)


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(REPO / "training")) for s in SCRIPTS])
def test_script_dry_run_parses(script, tmp_path):
    folder = script_folder(script).name
    step = {v: k for k, v in FOLDER.items() if k not in ("prompt_eval", "rw_eval")}[folder]
    out = str(tmp_path / "out")
    if "evaluation_scripts" in script.parts:
        args = []
    elif step == "step3":
        args = ["", "", "", "", out]
    else:
        args = [out]
    calls = run_shimmed(script, args, tmp_path, env={"LAUNCHER_ARGS": "--no_ssh --node_rank 1 --master_addr 10.0.0.1"})
    assert len(calls) == 1
    launcher, *words = calls[0]
    program_at = next(i for i, w in enumerate(words) if w.endswith(".py"))
    launcher_args, program, argv = words[:program_at], words[program_at], words[program_at + 1:]
    step = {"prompt_eval.py": "prompt_eval", "rw_eval.py": "rw_eval"}.get(program, step)
    assert (script_folder(script) / program).is_file()
    deployment = script.parent.name
    if deployment == "cpu" or "evaluation_scripts" in script.parts:
        assert launcher == "python" and launcher_args == []
    else:
        assert launcher == "deepspeed"
        assert ("--num_gpus" in launcher_args) == (deployment == "single_gpu")
        if deployment == "multi_node":
            assert launcher_args[:2] == ["--hostfile", "/job/hostfile"] and "--no_ssh" in launcher_args
    if step == "step2_dpo":
        if not DPO:
            pytest.skip("training/step2_dpo is not there yet")
        cls = dpo_config()
    else:
        cls = CONFIG[step]
    if "evaluation_scripts" not in script.parts:
        assert flag_values(argv)["output_dir"] == [out]
    cfg = parse_config(cls, argv)
    # chatrlhf's own scripts say everything explicitly: nothing in them works differently from DeepSpeed-Chat.
    assert dschat.notice(step, cls, cfg, argv) == ""
    if step in ("step1", "step2_reward", "step3"):
        lora = [p for p in ("", "actor_", "critic_") if to_flat(cfg).get(f"{p}lora_dim", 0) > 0]
        assert all(to_flat(cfg)[f"{p}lora_module_name"] for p in lora)


@pytest.mark.parametrize("folder", ["step1_supervised_finetuning", "step2_reward_model_finetuning",
                                    "step2_dpo_finetuning", "step3_rlhf_finetuning"])
def test_alias_main_runs_from_the_dschat_folder(folder):
    if folder == "step2_dpo_finetuning" and not DPO:
        pytest.skip("training/step2_dpo is not there yet")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "main.py", "--help"], cwd=REPO / "training" / folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--deepscale_config" in proc.stdout and "--enable_test_mode" in proc.stdout


# ------------------------------------------------------------------------------------------ train.py / e2e_rlhf.py

def test_opt_size_shorthand_and_empty_zero_stage():
    opts = cli.parse_options(["--actor-model", "1.3b", "--reward-model", "350m", "--actor-zero-stage", "",
                              "--reward-zero-stage", "2"])
    assert (opts.actor_model, opts.reward_model) == ("facebook/opt-1.3b", "facebook/opt-350m")
    assert (opts.actor_zero_stage, opts.reward_zero_stage) == (None, 2)
    assert cli.parse_options(["--actor-model", "facebook/opt-13b"]).actor_model == "facebook/opt-13b"
    assert cli.parse_options(["--actor-model", "Qwen/Qwen2.5-7B"]).actor_model == "Qwen/Qwen2.5-7B"
    with pytest.raises(SystemExit):
        cli.parse_options(["--actor-zero-stage", "4"])


def test_e2e_rlhf_py_has_dschat_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "e2e_rlhf.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--actor-model" in proc.stdout, proc.stderr
    assert cli.e2e_argv([]) == ["--actor-model", "1.3b", "--reward-model", "350m", "--deployment-type", "single_gpu"]
    assert cli.e2e_argv(["--actor-model", "6.7b"])[:2] == ["--reward-model", "350m"]
    assert "e2e_argv" in (REPO / "e2e_rlhf.py").read_text()


def test_step3_alone_finds_dschat_output_layout(tmp_path, tiny_model_dir):
    import shutil

    out = tmp_path / "output"
    for sub in ("actor-models/1.3b", "reward-models/350m"):
        shutil.copytree(tiny_model_dir("opt", chat_template=False), out / sub)
    opts = cli.parse_options(["--step", "3", "--actor-model", "1.3b", "--reward-model", "350m", "--output-dir",
                              str(out)])
    used = cli.dschat_inputs(opts)
    assert used == [str(out / "actor-models/1.3b"), str(out / "reward-models/350m")]
    words = shlex.split(opts.step3_args)
    assert words == ["--actor_model_name_or_path", used[0], "--critic_model_name_or_path", used[1]]
    # chatrlhf's own layout wins when it is there; an explicit path too.
    shutil.copytree(tiny_model_dir("opt", chat_template=False), out / "step1_sft")
    opts = cli.parse_options(["--step", "3", "--actor-model", "1.3b", "--reward-model", "350m", "--output-dir",
                              str(out), "--step3-args", "--critic_model_name_or_path x"])
    assert cli.dschat_inputs(opts) == []


def test_rw_eval_with_only_a_model_scores_built_in_pairs(tiny_model_dir, capsys):
    from chatrlhf.training.step2_reward import rw_eval

    results = rw_eval.main(["--model_name_or_path", str(tiny_model_dir("llama", head="score")),
                            "--num_padding_at_beginning", "1", "--add_eot_token"])
    assert len(results) == len(rw_eval.BUILTIN_PAIRS) and all(len(r["scores"]) == 2 for r in results)
    out = capsys.readouterr().out
    assert "pairwise accuracy" in out and "--num_padding_at_beginning: no effect" in out


def test_dschat_folders_are_not_installed():
    from setuptools import find_packages

    found = find_packages(where=str(REPO / "training"))
    assert "step1_sft" in found and not [p for p in found if p.split(".")[0] in set(FOLDER.values())]
