"""DeepSpeed-Chat compatibility: the flags whose meaning or default differs here, and the start-up notice.

Every step (and rw_eval, prompt_eval) calls `print_notice` once, on rank 0, before it does any work. The notice
lists, for that run only:

- each flag *given* (on the command line or in --config) whose DeepSpeed-Chat meaning is not what chatrlhf does
  with it (`GIVEN`), whoever runs it;
- each DeepSpeed-Chat default that differs here and that the run *relies on* (the flag not given; `DEFAULTS`),
  but only for a DeepSpeed-Chat command line, recognised by `--deepspeed` (or `--deepscale`): every DeepSpeed-Chat
  training script passes it and it has no other effect, while someone who never used DeepSpeed-Chat has no
  DeepSpeed-Chat default to rely on.

Nothing is printed when nothing differs. docs/FROM_DSCHAT.md has the same table (tests/test_dschat_compat.py checks
that every entry here is there). No step is imported: a step's config class is passed in.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from chatrlhf.utils.config import build_parser, flag_table, read_yaml

TRAINING = ("step1", "step2_reward", "step2_dpo", "step3")
UNSET = object()  # DeepSpeed-Chat had no default (the flag was required)


@dataclass(frozen=True)
class Default:
    """A DeepSpeed-Chat default that differs here; listed when a DeepSpeed-Chat command line leaves the flag out."""

    flag: str
    programs: tuple[str, ...]
    dschat: Any                 # DeepSpeed-Chat's default value
    here: str                   # what chatrlhf's default does, and how to get DeepSpeed-Chat's
    applies: Callable[[Any], bool] | None = None
    dschat_text: str | None = None  # how to show DeepSpeed-Chat's default when its repr would mislead


@dataclass(frozen=True)
class Given:
    """A flag whose DeepSpeed-Chat meaning differs from what chatrlhf does with it; listed when given."""

    flag: str
    dschat: str                 # what DeepSpeed-Chat did with it
    here: str                   # what chatrlhf does instead
    applies: Callable[[Any], bool] | None = None
    programs: tuple[str, ...] | None = None  # None: every program that has the flag


def _lora(attr: str) -> Callable[[Any], bool]:
    return lambda cfg: getattr(cfg, attr).lora_dim > 0


DEFAULTS = (
    Default("dtype", TRAINING, "fp16", "bf16 where the accelerator supports it (no fp16 loss scaling), else fp32; "
            "--dtype fp16 gives DeepSpeed-Chat's"),
    Default("data_path", TRAINING, ["Dahoas/rm-static"], "the HH-RLHF sample shipped with chatrlhf (no download); "
            "--data_path Dahoas/rm-static gives DeepSpeed-Chat's"),
    Default("output_dir", TRAINING, None, "the model is saved there", dschat_text="none: nothing was saved"),
    Default("per_device_train_batch_size", ("step1", "step2_reward", "step2_dpo"), 16, "a smaller micro-batch"),
    Default("per_device_eval_batch_size", ("step1", "step2_reward", "step2_dpo"), 16, "a smaller micro-batch"),
    Default("learning_rate", ("step1", "step2_dpo"), 1e-3, "a rate for full fine-tuning (DeepSpeed-Chat's suits "
            "only its scripts, which all pass their own)"),
    Default("eval_interval", ("step2_reward",), 0, "held-out accuracy every N steps too (DeepSpeed-Chat: before "
            "training and after each epoch only)"),
    Default("per_device_generation_batch_size", ("step3",), 16, "a smaller generation batch"),
    Default("per_device_training_batch_size", ("step3",), 16, "a smaller PPO minibatch"),
    Default("num_warmup_steps", ("step3",), 100, "no learning-rate warmup; --num_warmup_steps 100 gives "
            "DeepSpeed-Chat's"),
    Default("seed", ("step3",), None, "seeded, so a run is reproducible", dschat_text="none: not seeded"),
    Default("enable_hybrid_engine", ("step3",), False, "generation gathers the ZeRO-3 actor once and merges LoRA "
            "(the same answers, faster); --enable_hybrid_engine false for per-module ZeRO-3 generate"),
    Default("kl_coef", ("step3",), 0.1, "a smaller KL penalty; --kl_coef 0.1 gives DeepSpeed-Chat's",
            dschat_text="0.1, a constant (no flag)"),
    Default("lora_module_name", ("step1", "step2_reward", "step2_dpo"), "decoder.layers.",
            "every Linear layer of the transformer blocks: on OPT the same layers; elsewhere DeepSpeed-Chat's "
            "default matched nothing and trained without LoRA", applies=_lora("model")),
    Default("actor_lora_module_name", ("step3",), "decoder.layers.", "every Linear layer of the actor's "
            "transformer blocks (on OPT the same layers; elsewhere DeepSpeed-Chat's default matched nothing)",
            applies=_lora("actor")),
    Default("critic_lora_module_name", ("step3",), "decoder.layers.", "every Linear layer of the critic's "
            "transformer blocks (on OPT the same layers; elsewhere DeepSpeed-Chat's default matched nothing)",
            applies=_lora("critic")),
)

GIVEN = (
    Given("num_padding_at_beginning", "skips that many leading pad tokens (OPT's) to find the answer's end",
          "no effect: the score is read at the last token where attention_mask is 1, the same position"),
    Given("add_eot_token", "adds <|endoftext|> to the tokenizer and ends every example with it",
          "no effect: every answer ends with the tokenizer's own EOS token and no token is added"),
    Given("eot_token", "the token --add_eot_token adds", "no effect (see --add_eot_token)"),
    Given("align_overflow", "skips both models' step when either overflows in fp16",
          "no effect: actor and critic each skip their own fp16-overflow steps (use bf16, which has none)"),
    Given("preprocessing_num_workers", "processes for preprocessing",
          "no effect: each node tokenises once and caches the result"),
    Given("enable_test_mode", "stops after --test_stop_step steps without fp16 overflow, in the first epoch",
          "stops after --test_stop_step steps, overflowed ones counted, in the first epoch (--max_steps N "
          "--num_train_epochs 1)", applies=lambda cfg: cfg.dschat.enable_test_mode),
    Given("deepspeed_config", "refused by deepspeed.initialize next to the script's own config",
          "merged over the DeepSpeed config chatrlhf builds (your keys win)"),
    Given("deepscale_config", "refused by deepspeed.initialize next to the script's own config",
          "merged over the DeepSpeed config chatrlhf builds (your keys win), as --deepspeed_config"),
    Given("gradient_accumulation_steps", "accumulates across rollouts when a rollout has fewer minibatches",
          "an optimizer step stays within one rollout: a DeepSpeed-Chat command line whose step would span rollouts "
          "collects them into one (--generation_batches raised to match; the same updates with --ppo_epochs 1)",
          applies=lambda cfg: is_dschat_command_line(cfg) and cfg.actor_optim.gradient_accumulation_steps > 1,
          programs=("step3",)),
    Given("tp_gather_partition_size", "layers gathered at a time for tensor-parallel generation (with "
          "--inference_tp_size > 1 only)", "decoder layers gathered at a time with --unpin_actor_parameters"),
    Given("tensorboard_path", "events under <path>/ds_tensorboard_logs/<job>_tensorboard/",
          "events in <path> itself, with chatrlhf's metric names", applies=lambda cfg: _enabled_tensorboard(cfg)),
    Given("top_k", "unused (prompt_eval decodes greedily)",
          "the contrastive-search k with --penalty_alpha, the top-k of sampling with --do_sample, else unused",
          programs=("prompt_eval",)),
    Given("num_beams", "unused (prompt_eval decodes greedily)", "beam search with that many beams",
          applies=lambda cfg: cfg.num_beams > 1, programs=("prompt_eval",)),
    Given("penalty_alpha", "unused (prompt_eval decodes greedily)", "contrastive search with that degeneration "
          "penalty", applies=lambda cfg: cfg.penalty_alpha > 0, programs=("prompt_eval",)),
)


def _enabled_tensorboard(cfg) -> bool:
    return any(getattr(v, "enable_tensorboard", False) for v in vars(cfg).values())


def given_flags(cls: type, argv: list[str] | None = None) -> set[str]:
    """The flags set on the command line `argv` (default sys.argv[1:]) or in its --config file, by flag name."""
    args = vars(build_parser(cls).parse_args(sys.argv[1:] if argv is None else list(argv)))
    config = args.pop("config", None)
    return set(args) | (set(read_yaml(config)) if config else set())


def is_dschat_command_line(cfg) -> bool:
    dschat = getattr(cfg, "dschat", None)
    return bool(dschat is not None and (dschat.deepspeed or dschat.deepscale))


def _show(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def differences(program: str, cls: type, cfg, given: set[str]) -> list[tuple[str, str]]:
    """[(flag, explanation)] of the notice for a run of `program` (step1, step2_reward, step2_dpo, step3, rw_eval,
    prompt_eval) with config class `cls`, resolved config `cfg` and the flags `given`."""
    table = flag_table(cls)
    out = []
    for g in GIVEN:
        if (g.flag in given and g.flag in table and (g.programs is None or program in g.programs)
                and (g.applies is None or g.applies(cfg))):
            out.append((g.flag, f"{g.here} (DeepSpeed-Chat: {g.dschat})"))
    if is_dschat_command_line(cfg):
        for d in DEFAULTS:
            if program not in d.programs or d.flag in given or d.flag not in table:
                continue
            ours = table[d.flag][2]
            if ours == d.dschat or (d.applies is not None and not d.applies(cfg)):
                continue
            shown = d.dschat_text or _show(d.dschat)
            out.append((d.flag, f"not given, so {_show(ours)}: {d.here} (DeepSpeed-Chat's default: {shown})"))
    return out


def notice(program: str, cls: type, cfg, argv: list[str] | None = None) -> str:
    """The notice text ('' when nothing differs)."""
    rows = differences(program, cls, cfg, given_flags(cls, argv))
    if not rows:
        return ""
    lines = [f"chatrlhf: {len(rows)} DeepSpeed-Chat flag(s) of this run work differently here "
             "(docs/FROM_DSCHAT.md):"]
    lines += [f"  --{flag}: {text}" for flag, text in rows]
    return "\n".join(lines)


def print_notice(program: str, cls: type, cfg, argv: list[str] | None = None) -> str:
    """Prints `notice(...)` on rank 0 (the launcher's RANK; no process group is needed) and returns it."""
    from chatrlhf.utils.logging import print0

    text = notice(program, cls, cfg, argv)
    if text:
        print0(text)
    return text
