"""What each step will run with: recipe values, then the pipeline's wiring, then the user's overrides.

Priority, lowest first: the step's own defaults; the recipe's `common` then `stepN` section; what the pipeline
sets (model paths, output folders, --actor-zero-stage / --reward-zero-stage); `--common-args`; `--stepN-args`.
Step 3 starts from step 1's output (actor) and step 2's output (critic and reward model) unless overridden; with
`--step2-method dpo` step 2 is DPO, starting from step 1's output, and there is no step 3 (its recipe section is
`step2_dpo`).
Every step's flags are checked against its config class here, before anything runs.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatrlhf.training.pipeline import recipes
from chatrlhf.training.steps import STEP2_METHODS, STEPS, Step, pipeline_steps  # noqa: F401  (re-exported for the CLI)
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
        # Atomic: with --no-ssh every node writes it, while another node's ranks may be reading it.
        self.args_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args_file.with_name(f"{self.args_file.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(self.flags, sort_keys=False))
        os.replace(tmp, self.args_file)


@dataclass
class Plan:
    steps: list[StepPlan]
    recipe: Path
    actor: dict            # recipes.model_summary of the actor
    reward: dict
    output_dir: Path
    step2_method: str = "reward"  # "dpo": SFT then DPO (STEP2_METHODS)


def recipe_section(step: Step) -> str:
    """The recipe section of a step: stepN, or its own name for an alternative step (step2_dpo)."""
    return f"step{step.number}" if step.method in ("", "reward") else step.name


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
    method = getattr(opts, "step2_method", "reward")
    steps = pipeline_steps(method)
    for n in sorted({s.number for s in STEPS.values()} - set(steps)):
        if getattr(opts, f"step{n}_args", "").strip():
            raise PlanError(f"--step{n}-args: there is no step {n} with --step2-method {method} "
                            f"(its steps: {', '.join(f'{k} {s.title}' for k, s in steps.items())})")
    sections = recipes.read_recipe(recipe)
    common_cli = _parse_common(opts.common_args, steps.values())
    user = {n: parse_step_args(step, getattr(opts, f"step{n}_args"), f"--step{n}-args") for n, step in steps.items()}
    dirs: dict[int, Path] = {}
    plans = []
    for n, step in steps.items():
        wired: dict = {"output_dir": str(out / step.name)}
        if n == 1:
            wired.update(model_name_or_path=opts.actor_model, zero_stage=opts.actor_zero_stage)
        elif step.name == "step2_dpo":  # DPO trains the actor, from step 1's output
            wired.update(model_name_or_path=str(dirs[1]), zero_stage=opts.actor_zero_stage)
        elif n == 2:
            wired.update(model_name_or_path=opts.reward_model, zero_stage=opts.reward_zero_stage)
        else:
            wired.update(actor_model_name_or_path=str(dirs[1]), critic_model_name_or_path=str(dirs[2]),
                         actor_zero_stage=opts.actor_zero_stage, critic_zero_stage=opts.reward_zero_stage)
        wired = {k: v for k, v in wired.items() if v is not None}
        section = recipe_section(step)
        from_recipe = {**_for_step(step, sections["common"]), **sections[section]}
        flags = {**from_recipe, **wired, **_for_step(step, common_cli), **user[n]}
        flags = _fill(flags, step, actor, reward, where=f"{recipe.name} {section}")
        try:
            from_flat(step.config_class(), flags, where=f"step {n} ({step.title})")
        except ValueError as e:
            raise PlanError(f"{e}\n(values come from {recipe} and --common-args/--step{n}-args)") from None
        dirs[n] = Path(flags["output_dir"]).expanduser().resolve()
        plans.append(StepPlan(step, dirs[n], flags, out / "logs" / f"step{n}.log", out / "logs" / f"step{n}.yaml"))
    chosen = opts.step if opts.step is not None else list(steps)  # None: the whole path
    plan = Plan([p for p in plans if p.step.number in chosen], recipe, actor, reward, out, method)
    _check_inputs(plan, plans, user)
    return plan


def _parse_common(text: str, steps=None) -> dict:
    """--common-args: flags of any of `steps` (default: every registered step); each step takes the ones it has.
    A flag none of them has is an error."""
    if not text.strip():
        return {}
    steps = list(STEPS.values() if steps is None else steps)
    merged: dict = {}
    words = shlex.split(text)
    for step in steps:
        args, _ = _parser(step, "--common-args").parse_known_args(words)  # other steps' flags: checked below
        merged.update(vars(args))
    flags = [w.split("=")[0][2:] for w in words if w.startswith("--")]
    known = set().union(*(accepted_flags(s) for s in steps)) | {"config"}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise PlanError(f"--common-args: no step has flag(s) {unknown}")
    config = merged.pop("config", None)
    return {**(read_yaml(config) if config else {}), **merged}


def _fill(flags: dict, step: Step, actor: dict, reward: dict, where: str) -> dict:
    """Recipe placeholders: step 1, DPO and step 3's actor_* flags refer to the actor; step 2 and critic_* to the
    reward model (the critic starts from it)."""
    if step.number == 3:
        critic = {k: v for k, v in flags.items() if k.startswith("critic_")}
        rest = {k: v for k, v in flags.items() if k not in critic}
        return {**recipes.fill_placeholders(rest, actor, where), **recipes.fill_placeholders(critic, reward, where)}
    return recipes.fill_placeholders(flags, reward if step.name == "step2_reward" else actor, where)


def _check_inputs(plan: Plan, all_plans: list[StepPlan], user: dict) -> None:
    """A step run without the steps it starts from needs their outputs on disk already: step 3 those of steps 1
    and 2, DPO that of step 1."""
    chosen = {p.step.number for p in plan.steps}
    by_number = {p.step.number: p for p in all_plans}
    last = max(by_number)
    if last not in chosen:
        return
    needs = {3: ((1, "actor_model_name_or_path"), (2, "critic_model_name_or_path")),
             2: ((1, "model_name_or_path"),)}.get(last, ())
    flags = by_number[last].flags
    for n, key in needs:
        if n in chosen or key in user[last]:
            continue
        path = Path(flags[key])
        if not (path / "config.json").is_file():
            raise PlanError(f"step {last} starts from step {n}'s output {path}, which is not there: add {n} to "
                            f"--step, or give --step{last}-args '--{key} <folder>'")
