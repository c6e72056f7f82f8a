"""What each step will run with: recipe values, then the pipeline's wiring, then the user's overrides.

Priority, lowest first: the step's own defaults; the recipe's `common` then `stepN` section; what the pipeline
sets (model paths, output folders, --actor-zero-stage / --reward-zero-stage); `--common-args`; `--stepN-args`.
Step 3 starts from step 1's output (actor) and step 2's output (critic and reward model) unless overridden.
Every step's flags are checked against its config class here, before anything runs.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatrlhf.training.pipeline import recipes
from chatrlhf.training.steps import STEPS, Step
from chatrlhf.utils.config import build_parser, from_flat, read_yaml

DONE_FILE = "pipeline_done.json"


class PlanError(ValueError):
    """A wrong option, found before anything starts."""


@dataclass
class StepPlan:
    step: Step
    output_dir: Path
    flags: dict            # flat flag values given to the step (defaults left out)
    log: Path
    args_file: Path        # `flags` as YAML: the step runs with `--config <args_file>`

    @property
    def done_file(self) -> Path:
        return self.output_dir / DONE_FILE

    def done_record(self) -> dict | None:
        try:
            return json.loads(self.done_file.read_text())
        except (OSError, ValueError):
            return None

    def write_args(self) -> None:
        self.args_file.parent.mkdir(parents=True, exist_ok=True)
        self.args_file.write_text(yaml.safe_dump(self.flags, sort_keys=False))


@dataclass
class Plan:
    steps: list[StepPlan]
    recipe: Path
    actor: dict            # recipes.model_summary of the actor
    reward: dict
    output_dir: Path


def parse_step_args(step: Step, text: str, option: str) -> dict:
    """`--learning_rate 1e-5 --max_seq_len 256` -> {flag: typed value}, checked by the step's own parser."""
    parser = _parser(step, option)
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise PlanError(f"{option}: cannot split {text!r}: {e}") from None
    args, unknown = parser.parse_known_args(words)
    if unknown:
        unknown = [w for w in unknown if w.startswith("-")] or unknown
        raise PlanError(f"{option}: step {step.number} has no flag(s) {unknown} (see `python -m {step.module} --help`)")
    values = vars(args)
    config = values.pop("config", None)
    return {**(read_yaml(config) if config else {}), **values}


def _parser(step: Step, option: str):
    """The step's own argparse parser, raising PlanError instead of exiting, with no abbreviated flags."""
    parser = build_parser(step.config_class())
    parser.allow_abbrev = False

    def refuse(message):
        raise PlanError(f"{option}: {message} (see `python -m {step.module} --help`)")

    parser.error = refuse
    return parser


def accepted_flags(step: Step) -> set[str]:
    return {a.dest for a in build_parser(step.config_class())._actions} - {"help", "config"}


def _for_step(step: Step, values: dict) -> dict:
    """The part of a `common` mapping this step has flags for."""
    names = accepted_flags(step)
    return {k: v for k, v in values.items() if k in names}


def build_plan(opts, actor: dict, reward: dict, recipe: Path) -> Plan:
    """opts: the pipeline options (see cli.PipelineOptions); actor/reward: recipes.model_summary of each."""
    out = Path(opts.output_dir).expanduser().resolve()
    sections = recipes.read_recipe(recipe)
    common_cli = _parse_common(opts.common_args)
    user = {n: parse_step_args(STEPS[n], getattr(opts, f"step{n}_args"), f"--step{n}-args") for n in STEPS}
    dirs: dict[int, Path] = {}
    plans = []
    for n, step in STEPS.items():
        wired: dict = {"output_dir": str(out / step.name)}
        if n == 1:
            wired.update(model_name_or_path=opts.actor_model, zero_stage=opts.actor_zero_stage)
        elif n == 2:
            wired.update(model_name_or_path=opts.reward_model, zero_stage=opts.reward_zero_stage)
        else:
            wired.update(actor_model_name_or_path=str(dirs[1]), critic_model_name_or_path=str(dirs[2]),
                         actor_zero_stage=opts.actor_zero_stage, critic_zero_stage=opts.reward_zero_stage)
        wired = {k: v for k, v in wired.items() if v is not None}
        from_recipe = {**_for_step(step, sections["common"]), **sections[f"step{n}"]}
        flags = {**from_recipe, **wired, **_for_step(step, common_cli), **user[n]}
        flags = _fill(flags, n, actor, reward, where=f"{recipe.name} step{n}")
        try:
            from_flat(step.config_class(), flags, where=f"step {n} ({step.title})")
        except ValueError as e:
            raise PlanError(f"{e}\n(values come from {recipe} and --common-args/--step{n}-args)") from None
        dirs[n] = Path(flags["output_dir"]).expanduser().resolve()
        plans.append(StepPlan(step, dirs[n], flags, out / "logs" / f"step{n}.log", out / "logs" / f"step{n}.yaml"))
    plan = Plan([p for p in plans if p.step.number in opts.step], recipe, actor, reward, out)
    _check_inputs(plan, plans, user)
    return plan


def _parse_common(text: str) -> dict:
    """--common-args: flags of any step; each step takes the ones it has. A flag no step has is an error."""
    if not text.strip():
        return {}
    merged: dict = {}
    words = shlex.split(text)
    for step in STEPS.values():
        args, _ = _parser(step, "--common-args").parse_known_args(words)  # other steps' flags: checked below
        merged.update(vars(args))
    flags = [w.split("=")[0][2:] for w in words if w.startswith("--")]
    known = set().union(*(accepted_flags(s) for s in STEPS.values())) | {"config"}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise PlanError(f"--common-args: no step has flag(s) {unknown}")
    config = merged.pop("config", None)
    return {**(read_yaml(config) if config else {}), **merged}


def _fill(flags: dict, n: int, actor: dict, reward: dict, where: str) -> dict:
    """Recipe placeholders: step 1 and step 3's actor_* flags refer to the actor; step 2 and critic_* to the reward
    model (the critic starts from it)."""
    if n == 3:
        critic = {k: v for k, v in flags.items() if k.startswith("critic_")}
        rest = {k: v for k, v in flags.items() if k not in critic}
        return {**recipes.fill_placeholders(rest, actor, where), **recipes.fill_placeholders(critic, reward, where)}
    return recipes.fill_placeholders(flags, actor if n == 1 else reward, where)


def _check_inputs(plan: Plan, all_plans: list[StepPlan], user: dict) -> None:
    """Step 3 run without steps 1 or 2 needs their outputs on disk already."""
    chosen = {p.step.number for p in plan.steps}
    if 3 not in chosen:
        return
    step3 = all_plans[2].flags
    for n, key in ((1, "actor_model_name_or_path"), (2, "critic_model_name_or_path")):
        if n in chosen or key in user[3]:
            continue
        path = Path(step3[key])
        if not (path / "config.json").is_file():
            raise PlanError(f"step 3 starts from step {n}'s output {path}, which is not there: add {n} to --step, "
                            f"or give --step3-args '--{key} <folder>'")
