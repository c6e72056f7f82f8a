"""Stops a run that has gone wrong, saying why, before anything wrong is saved; warns about runs that learn nothing.

The checks read what the loop already has: each step's metrics after they were reduced over ranks (so every rank
sees the same numbers and all stop together, none left waiting in a collective), each evaluation's metrics, and
the weights once before every checkpoint and at the end. Step 3 adds one check of its rollout's tensors (scores,
log-probs, values) before they reach the PPO update: one flag vector reduced over ranks, one sync per step.
"""
from __future__ import annotations

import math

import torch

from chatrlhf.utils import distributed as dist

DIVERGED_HINT = ("the run diverged. Lower the learning rate{lr_flags}, add warmup (--num_warmup_steps), keep "
                 "--gradient_clipping on (1.0), prefer bf16 or fp32 over fp16")
REWARD_HINT = ("scores come from the reward model (--reward_model_name_or_path) or --reward_function: check that it "
               "returns finite numbers for every answer")


class NonFiniteError(RuntimeError):
    """A loss, gradient norm, score, log-probability, value or weight became NaN or infinite; the run stopped."""

    def __init__(self, message: str, *, step: int, quantity: str, value: float | None = None):
        super().__init__(message)
        self.step, self.quantity, self.value = step, quantity, value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def nonfinite_keys(metrics: dict) -> list[str]:
    """The keys of `metrics` whose value is a number that is NaN or infinite (floats or 0-d tensors)."""
    bad = []
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if _is_number(v) and not math.isfinite(v):
            bad.append(k)
    return bad


def _lr_text(lrs: dict[str, float]) -> str:
    return ", ".join(f"{flag} {lr:g}" for flag, lr in lrs.items()) or "unknown"


def _hint_for(quantity: str) -> str | None:
    """A score that is NaN in step 3 comes from the reward, not from the learning rate."""
    return REWARD_HINT + " (or the actor diverged: lower --actor_learning_rate)" if quantity.startswith(
        ("objective/score", "eval/score")) else None


def _ending(lrs: dict[str, float], output_dir, hint: str | None) -> str:
    from chatrlhf.training import checkpoint

    latest = checkpoint.latest(output_dir) if output_dir is not None else None
    kept = (f"the last good checkpoint, {latest}, is kept" if latest is not None else
            "no checkpoint had been written yet (--save_interval)")
    flags = f" ({_lr_text(lrs)})" if lrs else ""
    hint = hint or DIVERGED_HINT.format(lr_flags=flags)
    again = (" Rerun with a new --output_dir, or continue from the checkpoint with the new settings: "
             "--resume_with_changes." if latest is not None else "")
    return f"Stopped: nothing was saved from this state; {kept}. Hint: {hint}.{again}"


def check_metrics(metrics: dict, *, step: int, lrs: dict[str, float] | None = None, output_dir=None,
                  when: str | None = None, hint: str | None = None) -> None:
    """Raises NonFiniteError naming the first non-finite metric, the step, the learning rates and a hint.
    `metrics` must be the same on every rank (reduced), so that every rank raises."""
    bad = nonfinite_keys(metrics)
    if not bad:
        return
    lrs = lrs or {}
    value = metrics[bad[0]]
    value = value.item() if isinstance(value, torch.Tensor) else value
    where = when or f"step {step}"
    others = f" (also {', '.join(bad[1:])})" if len(bad) > 1 else ""
    raise NonFiniteError(f"{where}: {bad[0]} is {value}{others}; learning rate: {_lr_text(lrs)}. "
                         + _ending(lrs, output_dir, hint or _hint_for(bad[0])), step=step, quantity=bad[0],
                         value=value)


def check_tensors(tensors: dict, *, step: int, lrs: dict[str, float] | None = None, output_dir=None,
                  when: str | None = None, hint: str | None = None) -> None:
    """`tensors`: {name: tensor or (tensor, mask)}; positions where mask is 0 are not checked (padding).
    One flag per name, reduced over ranks with one all-reduce: every rank raises if any rank saw NaN/inf."""
    if not tensors:
        return
    flags = []
    for value in tensors.values():
        t, mask = value if isinstance(value, tuple) else (value, None)
        bad = ~torch.isfinite(t.detach())
        if mask is not None:
            bad = bad & (mask.detach() != 0)
        flags.append(bad.any())
    found = dist.all_reduce_max(torch.stack(flags).float().to(dist.device())).tolist()
    names = [name for name, f in zip(tensors, found) if f]
    if names:
        where = when or f"step {step}"
        lrs = lrs or {}
        raise NonFiniteError(f"{where}: {', '.join(names)} hold NaN or inf; learning rate: {_lr_text(lrs)}. "
                             + _ending(lrs, output_dir, hint), step=step, quantity=names[0])


def _local_parameters(engine):
    """(name, tensor) of the weights this rank holds: its ZeRO-3 partition, or the whole parameter."""
    module = getattr(engine, "module", engine)
    for name, p in module.named_parameters():
        yield name, getattr(p, "ds_tensor", p)


def check_weights(engines: dict, *, step: int, lrs: dict[str, float] | None = None, output_dir=None,
                  when: str | None = None, hint: str | None = None) -> None:
    """Raises NonFiniteError when any engine's weights (any rank's shard) hold NaN or inf. One pass over the
    weights and one all-reduce: called before each checkpoint, at the start and at the end, not per step."""
    engines = {k: e for k, e in engines.items() if e is not None}
    flags = []
    for engine in engines.values():
        dev = dist.device()
        local = [(~torch.isfinite(t.detach())).any().to(dev) for _, t in _local_parameters(engine) if t.numel()]
        flags.append(torch.stack(local).any() if local else torch.zeros((), dtype=torch.bool, device=dev))
    if not flags:
        return
    found = dist.all_reduce_max(torch.stack(flags).float()).tolist()
    broken = [name for name, f in zip(engines, found) if f]
    if not broken:
        return
    first = {}
    for name in broken:
        bad = [n for n, t in _local_parameters(engines[name]) if t.numel() and not torch.isfinite(t.detach()).all()]
        first[name] = f"{len(bad)} tensor(s) on rank {dist.get_rank()}, e.g. {bad[0]}" if bad else "on another rank"
    where = when or f"step {step}"
    detail = "; ".join(f"{name}: {first[name]}" for name in broken)
    raise NonFiniteError(f"{where}: the weights of {', '.join(broken)} hold NaN or inf ({detail}); learning rate: "
                         f"{_lr_text(lrs or {})}. " + _ending(lrs or {}, output_dir, hint), step=step,
                         quantity=f"weights of {broken[0]}")


ROLLOUT_TENSORS = ("scores", "logprobs", "ref_logprobs", "values")


def check_rollout(rollout, *, step: int, engines: dict, output_dir=None) -> None:
    """Step 3: the rollout's scores, log-probs (actor, reference) and values must be finite on the counted tokens
    before they reach the PPO update (attributes that are absent or None are skipped)."""
    mask = getattr(rollout, "action_mask", None)
    tensors = {}
    for name in ROLLOUT_TENSORS:
        t = getattr(rollout, name, None)
        if isinstance(t, torch.Tensor):
            tensors[name] = (t, mask) if mask is not None and t.shape == mask.shape else t
    engines = {k: e for k, e in engines.items() if e is not None}
    try:
        check_tensors(tensors, step=step, lrs=learning_rates(engines), output_dir=output_dir,
                      when=f"step {step}, the rollout")
    except NonFiniteError as e:
        if e.quantity == "scores":
            raise NonFiniteError(str(e).split(" Hint: ")[0] + f" Hint: {REWARD_HINT}.", step=step,
                                 quantity="scores") from None
        raise


BROKEN_MODEL_HINT = ("the model was already broken when loaded (saved from a diverged run?): retrain it, or start "
                     "from another model")


def grad_norm(engine) -> float | None:
    """The global gradient norm DeepSpeed computed at the last optimizer step (None when it computes none, e.g.
    ZeRO-0 fp32 with a torch optimizer; `supervised_step` computes that one itself)."""
    ds = getattr(engine, "engine", engine)
    getter = getattr(ds, "get_global_grad_norm", None)
    value = getter() if getter is not None else None
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if math.isinf(value) and _skips_overflow(ds):
        return None  # fp16 loss scaling: an overflowing step is skipped and the scale lowered, by design
    return value


def _skips_overflow(ds) -> bool:
    fp16 = getattr(ds, "fp16_enabled", None)
    return bool(fp16 and fp16())


def grad_norms(engines: dict) -> dict[str, float]:
    """{"train/grad_norm": norm} for a single engine named "model", else {"train/grad_norm_<name>": norm}, for the
    engines whose norm DeepSpeed computed."""
    out = {}
    for name, engine in engines.items():
        value = grad_norm(engine) if engine is not None else None
        if value is not None:
            out["train/grad_norm" if name == "model" else f"train/grad_norm_{name}"] = value
    return out


def needs_own_grad_norm(engine) -> bool:
    """Whether DeepSpeed leaves the gradient norm uncomputed for this engine: its optimizer is a plain torch one
    (ZeRO-0 in fp32), not one of DeepSpeed's wrappers (ZeRO 1-3, bf16, fp16), which compute it."""
    ds = getattr(engine, "engine", engine)
    optimizer = getattr(ds, "optimizer", None)
    return isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "_global_grad_norm")


def local_grad_norm(engine) -> torch.Tensor:
    """The 2-norm of the gradients this rank holds, as a device tensor (no sync). Under ZeRO-0 gradients are
    averaged over ranks in backward at the accumulation boundary, so every rank computes the same global norm."""
    module = getattr(engine, "module", engine)
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=dist.device())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def learning_rates(engines: dict) -> dict[str, float]:
    """{flag: current learning rate} of the trained engines ("model" -> --learning_rate, "actor" ->
    --actor_learning_rate)."""
    out = {}
    for name, engine in engines.items():
        lr = getattr(engine, "lr", None)
        if lr is None:
            continue
        try:
            out["--learning_rate" if name == "model" else f"--{name}_learning_rate"] = float(lr())
        except (AttributeError, IndexError, TypeError):
            continue
    return out


class RunHealth:
    """Warnings for runs that end without error but learned nothing: the training loss stayed at the loss of a
    model that has learned nothing (SFT: ln(vocab size)) for the whole run, or a training accuracy stayed 0."""

    def __init__(self, chance_loss: float | None = None, min_steps: int = 10, tolerance: float = 0.02):
        self.chance_loss, self.min_steps, self.tolerance = chance_loss, min_steps, tolerance
        self.losses: list[float] = []
        self.accuracies: dict[str, list[float]] = {}

    def observe(self, metrics: dict) -> None:
        loss = metrics.get("train/loss")
        if _is_number(loss):
            self.losses.append(float(loss))
        for k, v in metrics.items():
            if k.startswith("train/") and k.endswith("accuracy") and _is_number(v):
                self.accuracies.setdefault(k, []).append(float(v))

    def warnings(self) -> list[str]:
        out = []
        c = self.chance_loss
        if c and len(self.losses) >= self.min_steps and all(abs(v - c) <= self.tolerance * c for v in self.losses):
            out.append(f"train/loss stayed at {c:.3f} (the loss of a model that has learned nothing) for all "
                       f"{len(self.losses)} steps: nothing was learned. Check --learning_rate (not 0?), the data's "
                       "answers and labels, and that the weights train (--only_optimize_lora without LoRA?)")
        for k, values in self.accuracies.items():
            if len(values) >= self.min_steps and all(v == 0 for v in values):
                out.append(f"{k} was 0 at every one of {len(values)} steps: chosen answers never scored above "
                           "rejected ones (tied scores?). Check the data's chosen/rejected order and --learning_rate")
        return out
