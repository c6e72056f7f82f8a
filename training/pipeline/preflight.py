"""Everything `train.py` can check before step 1 starts (and all that `--dry-run` runs), so that a run does not
fail an hour in on something that was knowable at the start.

- models: every model a chosen step loads exists and its config reads (a model an earlier chosen step will write
  stands for the model that step starts from);
- tokenizers: step 3's critic (step 2's output) must share the actor's tokenizer;
- data: every local data source exists and its records read (a few per file);
- resume: a step that would resume a checkpoint is compared with the settings the checkpoint was written with
  (chatrlhf.training.resume), before earlier steps spend their time;
- output: the output directory is writable, no other run holds it or a step's folder, and the disk has room for
  the checkpoints and models the run writes;
- memory: each step's memory plan (chatrlhf.training.memory_plan) against the device of this machine.

The step flags themselves are parsed and range-checked by `plan.build_plan` (every step's config class).
"""
from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.training import memory_plan
from chatrlhf.training.pipeline.plan import PlanError
from chatrlhf.utils.config import from_flat

PIPELINE_LOCK = ".chatrlhf_pipeline.lock"
MODEL_FLAGS = ("model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path",
               "reward_model_name_or_path", "reference_model_name_or_path")
RECORDS_CHECKED = 20


@dataclass
class Report:
    """What the checks found (printed by the pipeline); `problems` make it refuse."""
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run_all(plan, opts, deployment: str) -> Report:
    """Every check; raises PlanError listing every problem found (not only the first)."""
    report = Report()
    configs = {p.step.number: from_flat(p.step.config_class(), p.flags, where=f"step {p.step.number}")
               for p in plan.steps}
    sources = _model_sources(plan, configs)
    for check in (_models, _tokenizers, _data, _resume, _output, _disk, _memory):
        try:
            check(plan, opts, deployment, configs, sources, report)
        except PlanError as e:
            report.problems.append(str(e))
        except Exception as e:  # noqa: BLE001 - a check that cannot run is reported, it does not stop the run
            report.notes.append(f"check {check.__name__.strip('_')} skipped: {type(e).__name__}: {e}")
    if report.problems:
        raise PlanError("\n".join(f"- {p}" for p in report.problems)
                        + "\n(found before anything ran; --dry-run runs these checks alone)")
    return report


def _model_sources(plan, configs) -> dict[str, str]:
    """{model path a step loads: the model to check in its place}: a later step's input that an earlier chosen
    step writes stands for what that earlier step starts from (it has not been written yet)."""
    out = {}
    for p in plan.steps:
        cfg = configs[p.step.number]
        start = getattr(getattr(cfg, "model", None), "model_name_or_path", None)
        if start is not None:
            out[str(p.output_dir)] = out.get(start, start)
    return out


def _resolved(path: str, sources: dict[str, str]) -> str:
    if path in sources:
        return sources[path]
    return sources.get(str(Path(path).expanduser().resolve()), path)


def _loaded_models(plan, configs) -> list[tuple[int, str, str]]:
    """(step, flag, path) of every model a chosen step loads."""
    from chatrlhf.utils.config import to_flat

    out = []
    for p in plan.steps:
        flat = to_flat(configs[p.step.number])
        for flag in MODEL_FLAGS:
            if flat.get(flag):
                out.append((p.step.number, flag, str(flat[flag])))
    return out


def _models(plan, opts, deployment, configs, sources, report) -> None:
    from transformers import AutoConfig

    from chatrlhf.utils.smollm2 import resolve_model_path

    seen = set()
    for n, flag, path in _loaded_models(plan, configs):
        model = _resolved(path, sources)
        if model in seen:
            continue
        seen.add(model)
        if model == path and not Path(resolve_model_path(path)).expanduser().exists() and _is_local(path):
            report.problems.append(f"step {n} --{flag} {path}: no such model folder")
            continue
        try:
            AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=False)
        except (OSError, ValueError) as e:
            report.problems.append(f"step {n} --{flag} {path}: cannot read its model config ({str(e)[:200]})")


def _is_local(path: str) -> bool:
    from chatrlhf.training.pipeline.recipes import looks_local

    return looks_local(path)


def _tokenizers(plan, opts, deployment, configs, sources, report) -> None:
    from chatrlhf.utils.models import load_tokenizer

    for p in plan.steps:
        cfg = configs[p.step.number]
        actor, critic = getattr(cfg, "actor", None), getattr(cfg, "critic", None)
        if actor is None or critic is None:
            continue
        a, c = _resolved(actor.model_name_or_path, sources), _resolved(critic.model_name_or_path, sources)
        if a == c:
            continue
        try:
            same = load_tokenizer(a).get_vocab() == load_tokenizer(c).get_vocab()
        except (OSError, ValueError) as e:
            report.problems.append(f"step {p.step.number}: cannot load a tokenizer to compare ({e})")
            continue
        if not same:
            critic_from = f" (step 2 starts it from --reward-model {c})" if c != critic.model_name_or_path else ""
            report.problems.append(
                f"step {p.step.number}: the critic {critic.model_name_or_path}{critic_from} does not share the "
                f"actor's tokenizer ({a}); it must, since it scores the actor's tokens. Use a --reward-model of the "
                "actor's family, or keep this reward model with --step3-args '--critic_model_name_or_path <a model "
                "of the actor's family> --reward_model_name_or_path <this one>'")


def _data(plan, opts, deployment, configs, sources, report) -> None:
    from chatrlhf.training.data.formats import DataFormatError, Located, normalize
    from chatrlhf.training.data.sources import BUNDLED, is_local, read_located, resolve

    seen = set()
    for p in plan.steps:
        data = getattr(configs[p.step.number], "data", None)
        if data is None:
            continue
        for path in list(data.data_path) + list(data.sft_only_data_path):
            if path in seen:
                continue
            seen.add(path)
            real = Path(resolve(path)).expanduser()
            if not is_local(resolve(path)):
                report.notes.append(f"data {path}: a hub dataset, read when the step starts")
                continue
            if not real.exists():
                report.problems.append(f"step {p.step.number} --data_path {path}: no such file or folder")
                continue
            if real.is_file():
                try:
                    records = Located(itertools.islice(read_located(real), RECORDS_CHECKED))
                    normalize(records, str(real), data.data_format, data.skip_malformed or path in BUNDLED)
                except (DataFormatError, OSError, ValueError) as e:
                    report.problems.append(f"step {p.step.number} --data_path {path}: {e}")


def _resume(plan, opts, deployment, configs, sources, report) -> None:
    from chatrlhf.training import checkpoint, resume

    if opts.force:
        return
    for p in plan.steps:
        cfg = configs[p.step.number]
        run = getattr(cfg, "train", None) or getattr(cfg, "run", None)
        if p.done_record() or not run.resume:
            continue
        latest = checkpoint.latest(p.output_dir)
        if latest is None:
            continue
        try:
            resume.check(cfg, latest, allow_changes=run.resume_with_changes)
        except resume.ResumeRefused as e:
            text = str(e).split("\nEither start")[0]
            report.problems.append(
                f"step {p.step.number} would resume {text}\nWays out: --force (rerun the step from scratch), another "
                f"--output-dir, or --step{p.step.number}-args '--resume_with_changes' to continue it on purpose")


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _output(plan, opts, deployment, configs, sources, report) -> None:
    from chatrlhf.utils import lock

    out = Path(plan.output_dir)
    if out.exists() and not out.is_dir():
        raise PlanError(f"--output-dir {out} is a file, not a folder")
    base = _existing_ancestor(out)
    if not os.access(base, os.W_OK | os.X_OK):
        raise PlanError(f"--output-dir {out}: {base} is not writable")
    if getattr(opts, "node_rank", 0):
        return  # --no-ssh, a node other than 0: node 0's pipeline holds the locks of a shared output folder
    holder = lock.is_locked(out, PIPELINE_LOCK)
    if holder:
        raise PlanError(f"--output-dir {out} is in use by another pipeline run ({holder}): wait for it, stop it, or "
                        "use another --output-dir")
    for p in plan.steps:
        holder = lock.is_locked(p.output_dir)
        if holder:
            raise PlanError(f"step {p.step.number}'s folder {p.output_dir} is in use by a running step ({holder})")


def _shapes(cfg, sources) -> dict:
    shapes = {}
    for name in ("actor", "critic"):
        group = getattr(cfg, name, None)
        if group is not None:
            shapes[name] = memory_plan.shape_of(_resolved(group.model_name_or_path, sources))
    if getattr(cfg, "reward_model_name_or_path", None):
        shapes["reward"] = memory_plan.shape_of(_resolved(cfg.reward_model_name_or_path, sources))
    if getattr(cfg, "reference_model_name_or_path", None):
        shapes["reference"] = memory_plan.shape_of(_resolved(cfg.reference_model_name_or_path, sources))
    return shapes


def _checkpoint_bytes(cfg, sources) -> tuple[float, float]:
    """(bytes of one resumable checkpoint, bytes of the final model folders) of a step's config."""
    from chatrlhf.training.precision import training_dtype

    dtype = training_dtype(cfg.engine.dtype) if hasattr(cfg, "engine") else "fp32"
    models = []
    if getattr(cfg, "model", None) is not None:
        head = "score" if "reward" in type(cfg).__name__.lower() else "causal_lm"
        models.append((cfg.model, head))
    for name, head in (("actor", "causal_lm"), ("critic", "score")):
        if getattr(cfg, name, None) is not None:
            models.append((getattr(cfg, name), head))
    ckpt = final = 0.0
    for group, head in models:
        shape = memory_plan.shape_of(_resolved(group.model_name_or_path, sources), exact=False)
        m = memory_plan.trained_from(group, cfg.engine, head, shape)
        n, t = shape.num_params(head), memory_plan.trainable_params(m)
        ckpt += memory_plan.checkpoint_bytes(n, t, dtype)
        final += n * memory_plan.DTYPE_BYTES[dtype]
    return ckpt, final


def _disk(plan, opts, deployment, configs, sources, report) -> None:
    need, lines = 0.0, []
    for p in plan.steps:
        cfg = configs[p.step.number]
        run = getattr(cfg, "train", None) or getattr(cfg, "run", None)
        try:
            ckpt, final = _checkpoint_bytes(cfg, sources)
        except (OSError, ValueError):
            continue  # an unreadable model config is reported by _models
        kept = (run.save_total_limit + 1) if run.save_interval else 0  # one more while a save is being written
        step_need = kept * ckpt + final
        need += step_need
        lines.append(f"step {p.step.number}: {kept} x {memory_plan.human(ckpt)} checkpoints + "
                     f"{memory_plan.human(final)} model")
    free = shutil.disk_usage(_existing_ancestor(Path(plan.output_dir))).free
    report.notes.append(f"disk: about {memory_plan.human(need)} needed ({'; '.join(lines)}), "
                        f"{memory_plan.human(free)} free under {_existing_ancestor(Path(plan.output_dir))}")
    if need > free:
        raise PlanError(f"--output-dir {plan.output_dir}: the run writes about {memory_plan.human(need)} "
                        f"({'; '.join(lines)}) but only {memory_plan.human(free)} is free there. Keep fewer "
                        "checkpoints (--common-args '--save_total_limit 1'), or use another --output-dir")


def world_of(opts, deployment: str) -> tuple[int, int]:
    """(world size, ranks per host) the steps will run with."""
    if deployment == "cpu":
        n = opts.num_gpus or 1
        return n, n
    if deployment == "single_gpu":
        return 1, 1
    local = opts.num_gpus or _device_count()
    if deployment == "multi_node" and opts.hostfile and Path(opts.hostfile).is_file():
        slots = [int(w.split("=")[1]) for line in Path(opts.hostfile).read_text().splitlines()
                 for w in line.split() if w.startswith("slots=")]
        return (sum(min(s, opts.num_gpus) if opts.num_gpus else s for s in slots) or local), local
    return local, local


def _device_count() -> int:
    from chatrlhf.utils import distributed as dist

    try:
        return max(int(dist.accelerator().device_count()), 1)
    except Exception:  # noqa: BLE001
        return 1


def _memory(plan, opts, deployment, configs, sources, report) -> None:
    from chatrlhf.training.precision import training_dtype
    from chatrlhf.utils import distributed as dist

    world, local = world_of(opts, deployment)
    on_cpu = deployment == "cpu"
    here_cpu = dist.accelerator().device_name() == "cpu"
    for p in plan.steps:
        cfg = configs[p.step.number]
        if not hasattr(cfg, "engine"):
            continue
        dtype, title = training_dtype(cfg.engine.dtype), f"step {p.step.number} ({p.step.title})"
        try:
            if getattr(cfg, "actor", None) is not None:
                device, host = memory_plan.available_memory(on_cpu) if on_cpu == here_cpu else (None, None)
                budget = host / max(local, 1) if on_cpu and host else device
                reward_fn = bool(getattr(cfg, "reward_function", None)) and not cfg.reward_model_name_or_path
                built = memory_plan.plan_ppo(cfg, world=world, dtype=dtype, on_cpu=on_cpu, title=title,
                                             shapes=_shapes(cfg, sources), reward_is_function=reward_fn,
                                             budget=budget)
                enforce = cfg.run.memory_check
            elif getattr(cfg, "model", None) is not None:
                head = "score" if "reward" in type(cfg).__name__.lower() else "causal_lm"
                reference = getattr(cfg, "reference_model_name_or_path", None)
                if reference is None and getattr(cfg, "uses_reference", None) and cfg.uses_reference() and \
                        cfg.model.lora_dim == 0 and not getattr(cfg, "precompute_ref_logprobs", False):
                    reference = cfg.model.model_name_or_path  # DPO: a frozen copy of the model it starts from
                built = memory_plan.plan_supervised(
                    cfg.model, cfg.optim, cfg.engine, cfg.train, head=head, world=world, dtype=dtype,
                    on_cpu=on_cpu, pairs=head == "score" or hasattr(cfg, "beta"), title=title,
                    reference=_resolved(reference, sources) if reference else None,
                    shape=memory_plan.shape_of(_resolved(cfg.model.model_name_or_path, sources)))
                enforce = cfg.train.memory_check
            else:
                continue
        except (OSError, ValueError):
            continue  # an unreadable model config is reported by _models
        plan_, settings, build = built
        if on_cpu != here_cpu:  # planning for devices this machine does not have: the table only
            report.notes.append(memory_plan.table(plan_))
            continue
        try:
            memory_plan.check(plan_, settings, build, enforce=enforce, local_ranks=local,
                              print_fn=report.notes.append)
        except memory_plan.MemoryPlanError as e:
            report.problems.append(f"{title}: {e}")
