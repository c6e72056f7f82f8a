"""chatrlhf.utils.config: DeepSpeed-Chat's step-1 flags, YAML configs, round trips, prefixed groups, --help."""
import dataclasses
import operator
from dataclasses import dataclass

import pytest
import yaml

from chatrlhf.training.config import OPTIM_SHARED, DataArgs, DSChatArgs, EngineArgs, ModelArgs, OptimArgs, TrainArgs
from chatrlhf.training.step1_sft.config import SFTConfig
from chatrlhf.utils.config import (
    build_parser,
    field_docs,
    from_flat,
    group,
    load_config,
    parse_config,
    save_config,
    to_flat,
)

# Module level (not inside a test) so typing.get_type_hints and inspect.getsource can find it, as for real configs.


@dataclass
class TwoModels:
    """A step-3-like config: one ModelArgs group per model, prefixed, with per-group default overrides."""

    actor: ModelArgs = group(ModelArgs, "actor_", zero_stage=2)
    critic: ModelArgs = group(ModelArgs, "critic_")
    actor_optim: OptimArgs = group(OptimArgs, "actor_", shared=OPTIM_SHARED, learning_rate=1e-6)
    critic_optim: OptimArgs = group(OptimArgs, "critic_", shared=OPTIM_SHARED, learning_rate=5e-6)
    engine: EngineArgs = group(EngineArgs)
    kl_coef: float = 0.1
    """KL penalty, 10% of the reward scale."""


def get(cfg, path: str):
    return operator.attrgetter(path)(cfg)


# ------------------------------------------------------------------------------------------ DS-Chat step-1 flags

DS_CHAT_FLAGS = [
    (["--data_path", "Dahoas/rm-static", "local/file.jsonl"], "data.data_path", ["Dahoas/rm-static", "local/file.jsonl"]),
    (["--data_path", "one"], "data.data_path", ["one"]),
    (["--data_split", "6,2,2"], "data.data_split", "6,2,2"),
    (["--data_output_path", "/tmp/data_files"], "data.data_output_path", "/tmp/data_files"),
    (["--sft_only_data_path", "a.json", "b.json"], "data.sft_only_data_path", ["a.json", "b.json"]),
    (["--model_name_or_path", "facebook/opt-1.3b"], "model.model_name_or_path", "facebook/opt-1.3b"),
    (["--max_seq_len", "256"], "train.max_seq_len", 256),
    (["--per_device_train_batch_size", "4"], "train.per_device_train_batch_size", 4),
    (["--per_device_eval_batch_size", "2"], "train.per_device_eval_batch_size", 2),
    (["--learning_rate", "9.65e-6"], "optim.learning_rate", 9.65e-6),
    (["--weight_decay", "0."], "optim.weight_decay", 0.0),
    (["--weight_decay", "0.1"], "optim.weight_decay", 0.1),
    (["--num_train_epochs", "16"], "train.num_train_epochs", 16),
    (["--gradient_accumulation_steps", "4"], "optim.gradient_accumulation_steps", 4),
    (["--lr_scheduler_type", "linear"], "optim.lr_scheduler_type", "linear"),
    (["--lr_scheduler_type", "cosine"], "optim.lr_scheduler_type", "cosine"),
    (["--num_warmup_steps", "100"], "optim.num_warmup_steps", 100),
    (["--seed", "42"], "train.seed", 42),
    (["--output_dir", "out/sft"], "train.output_dir", "out/sft"),
    (["--gradient_checkpointing"], "model.gradient_checkpointing", True),
    (["--offload"], "engine.offload", True),
    (["--dtype", "fp16"], "engine.dtype", "fp16"),
    (["--dtype", "bf16"], "engine.dtype", "bf16"),
    (["--dtype", "fp32"], "engine.dtype", "fp32"),
    (["--zero_stage", "0"], "model.zero_stage", 0),
    (["--zero_stage", "1"], "model.zero_stage", 1),
    (["--zero_stage", "2"], "model.zero_stage", 2),
    (["--zero_stage", "3"], "model.zero_stage", 3),
    (["--lora_dim", "128"], "model.lora_dim", 128),
    (["--lora_module_name", "decoder.layers."], "model.lora_module_name", "decoder.layers."),
    (["--only_optimize_lora"], "engine.only_optimize_lora", True),
    (["--lora_learning_rate", "1e-4"], "optim.lora_learning_rate", 1e-4),
    (["--enable_tensorboard"], "train.enable_tensorboard", True),
    (["--tensorboard_path", "tb/step1"], "train.tensorboard_path", "tb/step1"),
    (["--dropout", "0.1"], "model.dropout", 0.1),
    (["--dropout", "0.0"], "model.dropout", 0.0),
    (["--local_rank", "0"], "dschat.local_rank", 0),
    (["--local_rank=1"], "dschat.local_rank", 1),  # what the deepspeed launcher passes
    (["--deepspeed"], "dschat.deepspeed", True),
    (["--deepspeed_config", "ds.json"], "engine.deepspeed_config", "ds.json"),
    (["--print_loss"], "train.print_loss", True),
    (["--add_eot_token"], "dschat.add_eot_token", True),
    (["--compute_fp32_loss"], "engine.compute_fp32_loss", True),
]


@pytest.mark.parametrize("argv,path,expected", DS_CHAT_FLAGS, ids=[" ".join(a) for a, _, _ in DS_CHAT_FLAGS])
def test_ds_chat_step1_flag_is_accepted_with_its_meaning(argv, path, expected):
    cfg = parse_config(SFTConfig, argv)
    value = get(cfg, path)
    assert value == expected and type(value) is type(expected)


BOOL_FLAGS = [
    ("gradient_checkpointing", "model.gradient_checkpointing"),
    ("offload", "engine.offload"),
    ("only_optimize_lora", "engine.only_optimize_lora"),
    ("enable_tensorboard", "train.enable_tensorboard"),
    ("print_loss", "train.print_loss"),
    ("add_eot_token", "dschat.add_eot_token"),
    ("compute_fp32_loss", "engine.compute_fp32_loss"),
    ("deepspeed", "dschat.deepspeed"),
]


@pytest.mark.parametrize("flag,path", BOOL_FLAGS)
def test_store_true_style_flags(flag, path):
    assert get(parse_config(SFTConfig, []), path) is False
    assert get(parse_config(SFTConfig, [f"--{flag}"]), path) is True
    # Alone before another flag: the next `--...` is not taken as its value.
    assert get(parse_config(SFTConfig, [f"--{flag}", "--seed", "7"]), path) is True
    for word in ("false", "False", "0", "no"):
        assert get(parse_config(SFTConfig, [f"--{flag}", word]), path) is False
    assert get(parse_config(SFTConfig, [f"--{flag}", "true"]), path) is True
    assert get(parse_config(SFTConfig, [f"--{flag}=false"]), path) is False


def test_launcher_local_rank_first_then_script_flags():
    cfg = parse_config(SFTConfig, ["--local_rank=1", "--deepspeed", "--zero_stage", "2"])
    assert (cfg.dschat.local_rank, cfg.dschat.deepspeed, cfg.model.zero_stage) == (1, True, 2)


def test_realistic_ds_chat_command_line_parses():
    argv = ("--data_path Dahoas/rm-static Dahoas/full-hh-rlhf --data_split 2,4,4 --model_name_or_path facebook/opt-1.3b "
            "--per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_seq_len 512 --learning_rate 9.65e-6 "
            "--weight_decay 0. --num_train_epochs 16 --gradient_accumulation_steps 1 --lr_scheduler_type cosine "
            "--num_warmup_steps 0 --seed 1234 --gradient_checkpointing --zero_stage 3 --deepspeed --output_dir out")
    cfg = parse_config(SFTConfig, argv.split())
    assert cfg.data.data_path == ["Dahoas/rm-static", "Dahoas/full-hh-rlhf"]
    assert cfg.data.data_split == "2,4,4"
    assert cfg.model.model_name_or_path == "facebook/opt-1.3b"
    assert (cfg.train.per_device_train_batch_size, cfg.train.per_device_eval_batch_size) == (8, 8)
    assert cfg.train.max_seq_len == 512
    assert cfg.optim.learning_rate == pytest.approx(9.65e-6)
    assert cfg.optim.weight_decay == 0.0
    assert cfg.train.num_train_epochs == 16
    assert cfg.optim.gradient_accumulation_steps == 1
    assert cfg.optim.lr_scheduler_type == "cosine"
    assert cfg.optim.num_warmup_steps == 0
    assert cfg.train.seed == 1234
    assert cfg.model.gradient_checkpointing is True
    assert cfg.model.zero_stage == 3
    assert cfg.dschat.deepspeed is True
    assert cfg.train.output_dir == "out"
    # Everything not given keeps its default.
    assert cfg.model.lora_dim == 0 and cfg.engine.offload is False


def test_ds_chat_lora_recipe_parses():
    argv = ("--model_name_or_path facebook/opt-1.3b --lora_dim 128 --lora_module_name decoder.layers. "
            "--only_optimize_lora --lora_learning_rate 5e-4 --zero_stage 0 --offload --dtype bf16 "
            "--enable_tensorboard --tensorboard_path tb --dropout 0.0 --local_rank=0")
    cfg = parse_config(SFTConfig, argv.split())
    assert cfg.model.lora_dim == 128 and cfg.model.lora_module_name == "decoder.layers."
    assert cfg.engine.only_optimize_lora and cfg.engine.offload and cfg.engine.dtype == "bf16"
    assert cfg.optim.lora_learning_rate == 5e-4 and cfg.model.dropout == 0.0
    assert cfg.train.enable_tensorboard and cfg.train.tensorboard_path == "tb"


def test_defaults_are_sane():
    cfg = parse_config(SFTConfig, [])
    assert cfg == SFTConfig()  # parsing nothing gives the dataclass defaults
    assert 1e-6 <= cfg.optim.learning_rate <= 1e-4  # not DeepSpeed-Chat's 1e-3, which wrecks a pretrained model
    assert cfg.optim.lora_learning_rate < 1e-3
    assert cfg.model.zero_stage == 0 and cfg.model.lora_dim == 0 and cfg.model.dropout is None
    assert cfg.engine.dtype == "auto" and cfg.optim.gradient_accumulation_steps == 1
    assert cfg.dschat.local_rank == -1 and cfg.dschat.deepspeed is False and cfg.engine.offload is False
    assert cfg.data.data_split == "2,4,4" and cfg.data.data_path
    assert cfg.train.output_dir == "output/step1_sft"  # SFTConfig's group override of TrainArgs' default
    assert cfg.train.num_train_epochs >= 1 and cfg.train.per_device_train_batch_size >= 1
    assert cfg.train.max_seq_len == 512


# ------------------------------------------------------------------------------------------ YAML and round trips

def test_yaml_config_gives_values_and_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": "from/yaml", "zero_stage": 2, "learning_rate": "1e-5", "data_path": ["x", "y"],
        "offload": True, "dtype": "bf16", "seed": 7, "--max_seq_len": 128,  # leading dashes are tolerated
    }))
    cfg = parse_config(SFTConfig, ["--config", str(path)])
    assert cfg.model.model_name_or_path == "from/yaml" and cfg.model.zero_stage == 2
    assert cfg.optim.learning_rate == 1e-5  # YAML reads `1e-5` as a string; converted to float
    assert cfg.data.data_path == ["x", "y"] and cfg.engine.offload is True and cfg.engine.dtype == "bf16"
    assert cfg.train.seed == 7 and cfg.train.max_seq_len == 128

    cfg = parse_config(SFTConfig, ["--config", str(path), "--zero_stage", "3", "--offload", "false", "--data_path", "z"])
    assert cfg.model.zero_stage == 3 and cfg.engine.offload is False and cfg.data.data_path == ["z"]
    assert cfg.model.model_name_or_path == "from/yaml"  # not overridden: kept from the file
    # The order of --config among the flags does not matter: flags always win.
    assert parse_config(SFTConfig, ["--seed", "9", "--config", str(path)]).train.seed == 9


def test_yaml_unknown_key_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("zero_stage: 1\nlearning_rat: 1.0e-5\n")
    with pytest.raises(SystemExit) as e:
        parse_config(SFTConfig, ["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "learning_rat" in err


@pytest.mark.parametrize("text,key", [("zero_stage: two\n", "zero_stage"), ("num_train_epochs: 1.5\n", "num_train_epochs"),
                                      ("max_seq_len: true\n", "max_seq_len"), ("offload: maybe\n", "offload"),
                                      ("dtype: fp8\n", "dtype"), ("seed: null\n", "seed")])
def test_yaml_bad_value_names_file_and_key(tmp_path, capsys, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse_config(SFTConfig, ["--config", str(path)])
    err = capsys.readouterr().err
    assert str(path) in err and key in err


def test_yaml_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="--config"):
        parse_config(SFTConfig, ["--config", str(tmp_path / "nope.yaml")])
    path = tmp_path / "list.yaml"
    path.write_text("- zero_stage\n- 1\n")
    with pytest.raises(ValueError, match="list.yaml"):
        parse_config(SFTConfig, ["--config", str(path)])


@pytest.mark.parametrize("argv,flag", [
    (["--zero_stage", "5"], "--zero_stage"),
    (["--zero_stage", "two"], "--zero_stage"),
    (["--data_split", "2,4"], "--data_split"),
    (["--data_split", "a,b,c"], "--data_split"),
    (["--dtype", "fp8"], "--dtype"),
    (["--lr_scheduler_type", "sometimes"], "--lr_scheduler_type"),
    (["--lora_dim", "-1"], "--lora_dim"),
    (["--dropout", "1.5"], "--dropout"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--offload", "maybe"], "--offload"),
    (["--learning_rate", "fast"], "--learning_rate"),
    (["--no_such_flag", "1"], "--no_such_flag"),
])
def test_bad_value_exits_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(SFTConfig, argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_save_load_round_trip(tmp_path):
    cfg = parse_config(SFTConfig, [
        "--data_path", "a", "b", "--sft_only_data_path", "c", "--learning_rate", "9.65e-6", "--zero_stage", "3",
        "--dtype", "bf16", "--lora_dim", "8", "--lora_module_name", "layers.", "--dropout", "0.0", "--offload",
        "--tensorboard_path", "tb", "--adam_eps", "1e-8", "--max_seq_len", "64", "--train_on_prompt"])
    path = save_config(cfg, tmp_path / "ckpt")
    assert path.parent == tmp_path / "ckpt" and path.is_file()
    flat = yaml.safe_load(path.read_text())
    assert flat["zero_stage"] == 3 and flat["data_path"] == ["a", "b"] and flat["lora_alpha"] == 1.0
    loaded = load_config(SFTConfig, tmp_path / "ckpt")
    assert loaded == cfg
    assert type(loaded.optim.learning_rate) is float and type(loaded.model.zero_stage) is int
    # Defaults round-trip too (None, empty lists).
    save_config(SFTConfig(), tmp_path / "defaults")
    assert load_config(SFTConfig, tmp_path / "defaults") == SFTConfig()
    # And a saved file works as --config.
    assert parse_config(SFTConfig, ["--config", str(path)]) == cfg


def test_to_flat_from_flat_are_inverse():
    cfg = SFTConfig()
    flat = to_flat(cfg)
    parser_flags = {a.dest for a in build_parser(SFTConfig)._actions} - {"help", "config"}
    assert set(flat) == parser_flags  # one flat key per flag, nothing else
    assert from_flat(SFTConfig, flat) == cfg
    with pytest.raises(ValueError, match="somewhere.yaml.*bogus"):
        from_flat(SFTConfig, {**flat, "bogus": 1}, where="somewhere.yaml")
    with pytest.raises(ValueError, match="seed"):
        from_flat(SFTConfig, {"seed": "abc"})


def test_every_step1_field_is_one_unique_flag():
    flat = to_flat(SFTConfig())
    groups = (ModelArgs, OptimArgs, EngineArgs, DataArgs, TrainArgs, DSChatArgs)
    expected = {f.name for g in groups for f in dataclasses.fields(g)} | {"train_on_prompt"}
    assert set(flat) == expected


# ------------------------------------------------------------------------------------------ prefixed groups

def test_prefixed_groups_make_prefixed_flags():
    flags = set(to_flat(TwoModels()))
    for name in (f.name for f in dataclasses.fields(ModelArgs)):
        assert f"actor_{name}" in flags and f"critic_{name}" in flags
        assert name not in flags
    assert {"actor_zero_stage", "critic_learning_rate", "actor_lora_dim", "offload", "kl_coef"} <= flags


def test_prefixed_group_defaults_and_values():
    cfg = parse_config(TwoModels, [])
    assert cfg == TwoModels()
    assert (cfg.actor_optim.learning_rate, cfg.actor.zero_stage) == (1e-6, 2)  # group overrides
    assert (cfg.critic_optim.learning_rate, cfg.critic.zero_stage) == (5e-6, 0)
    assert cfg.critic_optim.lora_learning_rate == OptimArgs().lora_learning_rate  # not overridden: the group's own
    cfg = parse_config(TwoModels, ["--actor_zero_stage", "3", "--critic_learning_rate", "1e-4", "--critic_lora_dim", "4",
                                   "--actor_gradient_checkpointing", "--offload"])
    assert cfg.actor.zero_stage == 3 and cfg.critic.zero_stage == 0
    assert cfg.critic_optim.learning_rate == 1e-4 and cfg.actor_optim.learning_rate == 1e-6
    assert cfg.critic.lora_dim == 4 and cfg.actor.lora_dim == 0
    assert cfg.actor.gradient_checkpointing and not cfg.critic.gradient_checkpointing and cfg.engine.offload


def test_shared_fields_of_two_groups_are_one_flag():
    flags = set(to_flat(TwoModels()))
    assert "num_warmup_steps" in flags and "actor_num_warmup_steps" not in flags
    assert {"actor_learning_rate", "critic_learning_rate", "actor_weight_decay"} <= flags
    cfg = parse_config(TwoModels, ["--num_warmup_steps", "7", "--critic_learning_rate", "2e-4"])
    assert cfg.actor_optim.num_warmup_steps == cfg.critic_optim.num_warmup_steps == 7
    assert (cfg.actor_optim.learning_rate, cfg.critic_optim.learning_rate) == (1e-6, 2e-4)
    assert from_flat(TwoModels, to_flat(cfg)) == cfg


def test_a_flag_declared_twice_is_refused():
    @dataclass
    class Clash:
        a: OptimArgs = group(OptimArgs, "x_")
        b: OptimArgs = group(OptimArgs, "x_")

    with pytest.raises(TypeError, match="declared twice"):
        build_parser(Clash)


def test_prefixed_group_round_trip_and_help(tmp_path, capsys, monkeypatch):
    cfg = parse_config(TwoModels, ["--actor_zero_stage", "1", "--critic_dropout", "0.0", "--kl_coef", "0.05"])
    save_config(cfg, tmp_path)
    assert load_config(TwoModels, tmp_path) == cfg
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        parse_config(TwoModels, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--actor_learning_rate" in out and "(default: 1e-06)" in out  # the override is shown as the default
    assert "KL penalty, 10% of the reward scale." in out  # a literal % does not break argparse


@pytest.mark.parametrize("argv,flag", [(["--actor_zero_stage", "5"], "--actor_zero_stage"),
                                       (["--critic_dropout", "2"], "--critic_dropout"),
                                       (["--critic_lora_dim", "-3"], "--critic_lora_dim")])
def test_prefixed_group_errors_name_the_prefixed_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_config(TwoModels, argv)
    assert flag in capsys.readouterr().err


def test_group_misuse_is_an_error():
    with pytest.raises(TypeError, match="no_such_field"):
        group(ModelArgs, "actor_", no_such_field=1)

    @dataclass
    class Clash:
        a: ModelArgs = group(ModelArgs, "x_")
        b: ModelArgs = group(ModelArgs, "x_")

    with pytest.raises(TypeError, match="declared twice"):
        build_parser(Clash)


# ------------------------------------------------------------------------------------------ --help

def test_help_contains_every_field_docstring(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping, so docstrings appear verbatim
    with pytest.raises(SystemExit) as e:
        parse_config(SFTConfig, ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for cls in (ModelArgs, OptimArgs, EngineArgs, DataArgs, TrainArgs, DSChatArgs, SFTConfig):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in ("model", "optim", "engine", "data", "train", "dschat"):
                continue
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert f"--{f.name}" in out
            assert docs[f.name] in out, f"--help lacks the docstring of {f.name}"
    assert "Step 1: supervised fine-tuning" in out


def test_field_docs_reads_attribute_docstrings():
    docs = field_docs(TwoModels)
    assert docs == {"kl_coef": "KL penalty, 10% of the reward scale."}
    assert field_docs(ModelArgs)["zero_stage"] == "ZeRO stage 0-3 for this model's DeepSpeed engine."
    # Multi-line docstrings are joined into one line.
    assert "\n" not in field_docs(ModelArgs)["lora_module_name"]
