"""`train.py` checks everything it can before step 1 starts, and `--dry-run` runs all of it: the critic's tokenizer,
data, a resume that would be refused, the output folder, disk space and each step's memory plan."""
from __future__ import annotations

from pathlib import Path

import pytest

from chatrlhf.training.pipeline import preflight
from chatrlhf.training.pipeline.cli import PipelineOptions, main, run_pipeline
from chatrlhf.training.pipeline.plan import PlanError


@pytest.fixture(scope="module")
def records(tmp_path_factory, hh_rlhf_sample) -> Path:
    return hh_rlhf_sample(60, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def other_vocab_model(tmp_path_factory) -> Path:
    """A tiny llama whose tokenizer has another vocabulary (a different family, as far as step 3 is concerned)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a completely different corpus of words"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    path = tmp_path_factory.mktemp("other-vocab")
    model.save_pretrained(path)
    hf.save_pretrained(path)
    return path


def options(model, out, data, **extra) -> PipelineOptions:
    opts = PipelineOptions(actor_model=str(model), reward_model=str(model), deployment_type="cpu", output_dir=str(out),
                           launcher="inprocess", report_samples=0,
                           common_args=f"--data_path {data} --data_output_path {out.parent / 'cache'} --dtype fp32 "
                                       "--skip_malformed --max_steps 2",
                           step3_args="--max_prompt_seq_len 32 --max_answer_seq_len 8")
    for k, v in extra.items():
        setattr(opts, k, v)
    return opts


def test_a_reward_model_with_another_tokenizer_is_refused_before_step_1(tiny_model_dir, other_vocab_model, records,
                                                                        tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--actor-model", str(tiny_model_dir("llama")), "--reward-model", str(other_vocab_model),
                 "--deployment-type", "cpu", "--launcher", "inprocess", "--output-dir", str(out),
                 "--common-args", f"--data_path {records}"])
    err = capsys.readouterr().err
    assert code == 2 and "does not share the actor's tokenizer" in err and "Nothing was run" in err, err
    assert f"--reward-model {other_vocab_model}" in err and "--reward_model_name_or_path" in err
    assert not out.exists()  # steps 1 and 2 did not run first


def test_dry_run_runs_every_check_and_writes_nothing(tiny_model_dir, records, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_pipeline(options(tiny_model_dir("llama"), out, records, dry_run=True))
    printed = capsys.readouterr().out
    assert result["steps"] == {}
    for part in ("memory plan: step 1 (SFT)", "memory plan: step 2 (reward model)", "memory plan: step 3 (PPO)",
                 "estimated peak", "disk: about", "free under"):
        assert part in printed, (part, printed[-3000:])
    assert not out.exists()


def test_every_problem_is_listed_before_anything_runs(tiny_model_dir, records, tmp_path, monkeypatch):
    out = tmp_path / "out"
    opts = options(tiny_model_dir("llama"), out, records,
                   step1_args=f"--data_path {tmp_path / 'missing.jsonl'}")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: type("U", (), {"free": 1024 ** 2})())
    with pytest.raises(PlanError) as e:
        run_pipeline(opts)
    message = str(e.value)
    assert "missing.jsonl: no such file" in message and "--save_total_limit" in message, message
    assert "found before anything ran" in message and not out.exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\nnot json\n')
    with pytest.raises(PlanError, match="bad.jsonl: line 2"):
        run_pipeline(options(tiny_model_dir("llama"), out, records, step1_args=f"--data_path {bad}",
                             common_args=f"--data_output_path {tmp_path / 'c'} --dtype fp32"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(PlanError, match="is a file, not a folder"):
        run_pipeline(options(tiny_model_dir("llama"), a_file, records))


def test_a_step_that_would_be_refused_on_resume_is_refused_before_step_1(tiny_model_dir, records, tmp_path):
    """Step 3 left a checkpoint with other settings: the pipeline says so before steps 1 and 2 spend their time."""
    from chatrlhf.training.pipeline.cli import prepare
    from chatrlhf.utils.config import from_flat, save_config

    out = tmp_path / "out"
    opts = options(tiny_model_dir("llama"), out, records, dry_run=True)
    plan, _, _ = prepare(opts)
    step3 = plan.steps[2]
    cfg = from_flat(step3.step.config_class(), {**step3.flags, "kl_coef": 0.5})
    ckpt = step3.output_dir / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt.parent / "latest").write_text("step_2")
    save_config(cfg, ckpt)
    with pytest.raises(PlanError) as e:
        run_pipeline(options(tiny_model_dir("llama"), out, records, dry_run=True))
    message = str(e.value)
    now = step3.flags["kl_coef"]  # the recipe's
    assert "step 3 would resume" in message and f"--kl_coef: 0.5 (checkpoint) -> {now} (now)" in message, message
    assert "--force" in message and "--step3-args '--resume_with_changes'" in message
    run_pipeline(options(tiny_model_dir("llama"), out, records, dry_run=True, force=True))  # --force: no resume


def test_a_step_that_does_not_fit_in_memory_is_refused_before_step_1(tiny_model_dir, records, tmp_path,
                                                                     monkeypatch):
    from chatrlhf.training import memory_plan

    monkeypatch.setattr(memory_plan, "available_memory", lambda on_cpu: (None, 0.3 * memory_plan.GB))
    with pytest.raises(PlanError) as e:
        run_pipeline(options(tiny_model_dir("llama"), tmp_path / "out", records))
    message = str(e.value)
    assert "step 1 (SFT): the memory plan of step 1 (SFT) needs about" in message
    assert "step 3 (PPO)" in message and "--memory_check false" in message


def test_step_flags_out_of_range_are_refused_by_the_plan(tiny_model_dir, records, tmp_path):
    with pytest.raises(PlanError, match="--learning_rate must be a finite number >= 0"):
        run_pipeline(options(tiny_model_dir("llama"), tmp_path / "out", records, step1_args="--learning_rate -1"))
    with pytest.raises(PlanError, match="--per_device_training_batch_size must be >= 1"):
        run_pipeline(options(tiny_model_dir("llama"), tmp_path / "out", records,
                             step3_args="--per_device_training_batch_size 0"))
