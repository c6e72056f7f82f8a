"""The end of a pipeline run: a summary table on the console and `<output>/report.md` with PNG plots and sample
answers of the SFT and the final model side by side (greedy): the RLHF actor, scored by the reward model, or with
`--step2-method dpo` the DPO model."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from chatrlhf.training.pipeline.plan import Plan
from chatrlhf.training.steps import Step
from chatrlhf.utils.logging import read_metrics

logger = logging.getLogger(__name__)

# Per step name: (metric key, label, format) shown as "before -> after" (first and last evaluation of the run).
KEY_METRICS = {
    "step1_sft": [("eval/perplexity", "eval perplexity", "{:.2f}")],
    "step2_reward": [("eval/accuracy", "held-out pairwise accuracy", "{:.3f}"),
                     ("eval/shorter_wins", '"the shorter answer wins" on the same pairs', "{:.3f}"),
                     ("eval/accuracy_length_controlled", "accuracy on pairs within 20% in length", "{:.3f}"),
                     # --heldout_shares: every pair it never trained on (eval split + later shares), as one set
                     ("heldout/pairs", "pairs it never trained on (eval split + --heldout_shares)", "{:d}"),
                     ("heldout/accuracy", "pairwise accuracy on those", "{:.3f}"),
                     ("heldout/shorter_wins", '"the shorter answer wins" on those', "{:.3f}"),
                     ("heldout/accuracy_length_controlled", "accuracy on those within 20% in length", "{:.3f}")],
    "step2_dpo": [("eval/accuracy", "held-out preference accuracy (implicit reward; ties half)", "{:.3f}"),
                  ("eval/logprob_accuracy", "held-out log-prob accuracy (chosen more likely)", "{:.3f}"),
                  ("eval/chosen_logprob", "log-prob of the held-out chosen answers", "{:.2f}"),
                  ("eval/kl_chosen", "KL to SFT on the chosen answers (nats)", "{:.2f}")],
    "step3_ppo": [("eval/score_mean", "held-out reward score", "{:+.3f}"),
                  ("eval/kl", "held-out KL to SFT (nats)", "{:.2f}"),
                  ("eval/response_length", "answer length (tokens)", "{:.1f}"),
                  ("eval/eos_fraction", "answers that end (EOS before the cap)", "{:.2f}")],
}


def metrics_by_step(output_dir: Path) -> list[dict]:
    """metrics.jsonl records merged per step (a resumed run logs some steps twice: the later record wins)."""
    merged: dict[int, dict] = {}
    for record in read_metrics(output_dir):
        merged.setdefault(record["step"], {}).update(record)
    return [merged[s] for s in sorted(merged)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def key_metrics(step: str, output_dir: Path) -> dict[str, list[float]]:
    """{key: [before, after]} of the key metrics of the step named `step` (e.g. step2_dpo); before is None when the
    run did not evaluate before training (--eval_before_training false). A metric logged with its standard error
    (`<key>_se`) brings it along as `<key>_se`, also [before, after]."""
    records = metrics_by_step(output_dir)
    out = {}
    for key, _, _ in KEY_METRICS[step]:
        for name in (key, key + "_se"):
            steps, values = series(records, name)
            if values:
                out[name] = [values[0] if steps[0] == 0 else None, values[-1]]
    return out


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def summary_rows(plan: Plan, results: dict) -> list[list[str]]:
    """[step, wall time, metric, before, after] rows; results: {step: {"wall_time_s", "skipped", "metrics"}}."""
    rows = []
    steps = {p.step.number: p.step for p in plan.steps}
    for n, res in sorted(results.items()):
        name = f"{n} {steps[n].title}"
        wall = duration(res.get("wall_time_s")) + (" (earlier run)" if res.get("skipped") else "")
        first = True
        for key, label, fmt in KEY_METRICS[steps[n].name]:
            if key not in res["metrics"]:
                continue
            before, after = res["metrics"][key]
            se = res["metrics"].get(key + "_se", [None, None])
            show = lambda value, err: ("-" if value is None else fmt.format(value)  # noqa: E731
                                       + ("" if err is None else f" +- {err:.3f}"))
            rows.append([name if first else "", wall if first else "", label, show(before, se[0]),
                         show(after, se[1])])
            first = False
        if first:
            rows.append([name, wall, "(no metrics)", "", ""])
        if steps[n].name == "step3_ppo":
            rows += comparison_rows(_step_dir(plan, n))
    total = sum(r.get("wall_time_s") or 0 for r in results.values() if not r.get("skipped"))
    rows.append(["steps run now", duration(total), "", "", ""])
    return rows


def _step_dir(plan: Plan, number: int) -> Path:
    return next(p.output_dir for p in plan.steps if p.step.number == number)


def comparison_rows(step3_dir: Path) -> list[list[str]]:
    """Summary rows of the paired held-out comparison (none when step 3 wrote no answers)."""
    c = heldout_comparison(step3_dir)
    if c is None:
        return []
    return [["", "", f"score gain, paired over {c.n} prompts (+- 1 SE)", "",
             f"{c.gain:+.3f} +- {c.gain_se:.3f}"],
            ["", "", "score gain at equal answer length (+- 1 SE)", "",
             f"{c.gain_at_equal_length:+.3f} +- {c.gain_at_equal_length_se:.3f}"]]


def heldout_comparison(step3_dir: Path):
    """compare.Comparison of step 3's first and last evaluation, or None."""
    from chatrlhf.training.step3_ppo import compare

    pair = compare.first_and_last(step3_dir)
    return compare.compare(*pair) if pair is not None else None


def format_table(rows: list[list[str]], header=("step", "wall time", "metric", "before", "after")) -> str:
    widths = [max(len(str(r[i])) for r in [list(header)] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(rows: list[list[str]], header=("step", "wall time", "metric", "before", "after")) -> str:
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


# ---- plots -------------------------------------------------------------------------------------------------
def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_step(step: Step, output_dir: Path, png: Path) -> bool:
    """Writes the step's curves to `png`; False when there is nothing to plot."""
    records = metrics_by_step(output_dir)
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "step1_sft": [("training loss", [("train/loss", "train loss", "-")]),
                      ("eval perplexity", [("eval/perplexity", "held-out", "o-")])],
        "step2_reward": [("pairwise accuracy", [("train/accuracy", "train", "-"), ("eval/accuracy", "held-out", "o-")]),
                         ("loss", [("train/loss", "train", "-"), ("eval/loss", "held-out", "o-")])],
        "step2_dpo": [("preference accuracy (implicit reward)",
                       [("train/accuracy", "train", "-"), ("eval/accuracy", "held-out", "o-"),
                        ("eval/logprob_accuracy", "held-out, log-prob", "s--")]),
                      ("loss", [("train/loss", "train", "-"), ("eval/loss", "held-out", "o-")]),
                      ("held-out log-probabilities (nats per answer)",
                       [("eval/chosen_logprob", "chosen", "o-"), ("eval/rejected_logprob", "rejected", "o-")])],
        "step3_ppo": [("reward-model score",
                       [("objective/scores", "rollouts", "-"), ("eval/score_mean", "held-out", "o-")]),
                      ("KL to the SFT model (nats per answer)",
                       [("objective/kl", "rollouts", "-"), ("eval/kl", "held-out", "o-")])],
    }[step.name]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6))
    for ax, (title, lines) in zip(axes, panels):
        for key, label, style in lines:
            x, y = series(records, key)
            if not x:
                continue
            if style == "-" and len(y) >= 6:  # per-step values are noisy: faint, with a running mean on top
                line, = ax.plot(x, y, "-", alpha=0.3, lw=1)
                ax.plot(x, running_mean(y, max(3, len(y) // 6)), "-", color=line.get_color(),
                        label=f"{label}, smoothed")
            else:
                ax.plot(x, y, style, label=label, markersize=4)
        if step.number == 2 and "accuracy" in title:
            ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_title(title)
        ax.set_xlabel("PPO step" if step.number == 3 else "optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"step {step.number}: {step.title}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


# ---- sample answers ----------------------------------------------------------------------------------------
def heldout_prompts(plan_flags: dict, tokenizer_path: str, n: int) -> list:
    """The `n` shortest held-out step-3 prompts (chat messages), from the same split step 3 evaluated on."""
    from chatrlhf.training.step3_ppo.config import PPOConfig
    from chatrlhf.training.step3_ppo.data import prompt_data
    from chatrlhf.utils.config import from_flat
    from chatrlhf.utils.models import load_tokenizer

    data = prompt_data(from_flat(PPOConfig, plan_flags), load_tokenizer(tokenizer_path, padding_side="left"))
    split = data.eval if len(data.eval) else data.train
    order = sorted(range(len(split)), key=lambda i: int(split[i]["length"]))[:n]
    return [json.loads(split[i]["prompt_messages"]) for i in order]  # stored as JSON text


def sample_answers(plan: Plan, n: int) -> list[dict]:
    """compare(SFT model, final model) on `n` held-out prompts, greedy. RLHF path: the step-3 actor, with the reward
    model's scores, answers as long as step 3's (at most 128 tokens). DPO path: the DPO model on the prompts of its
    own held-out pairs, no scores (there is no reward model), at most 128 tokens."""
    from chatrlhf.inference.prompt_eval import compare
    from chatrlhf.training.config import GenerationArgs

    last = final_step(plan)
    flags = last.flags
    if last.step.name == "step2_dpo":
        from chatrlhf.training.step2_dpo.config import DPOConfig
        from chatrlhf.training.step2_dpo.data import heldout_prompts as dpo_prompts
        from chatrlhf.utils.config import from_flat
        from chatrlhf.utils.models import load_tokenizer

        sft = flags["model_name_or_path"]
        prompts = dpo_prompts(from_flat(DPOConfig, flags), load_tokenizer(sft), n)
        return compare(sft, str(last.output_dir), prompts, max_new_tokens=128,
                       gen_args=GenerationArgs(do_sample=False), dtype=flags.get("dtype", "auto"),
                       batch_size=max(n, 1))
    prompts = heldout_prompts(flags, flags["actor_model_name_or_path"], n)
    reward = flags.get("reward_model_name_or_path") or flags["critic_model_name_or_path"]
    max_new_tokens = min(int(flags.get("max_answer_seq_len", 128)), 128)
    return compare(flags["actor_model_name_or_path"], str(last.output_dir / "actor"), prompts, reward_model=reward,
                   max_new_tokens=max_new_tokens, gen_args=GenerationArgs(do_sample=False),
                   dtype=flags.get("dtype", "auto"), batch_size=max(n, 1))


def final_step(plan: Plan):
    """The StepPlan whose model the pipeline ends with (step 3's actor, or DPO's model), if it was chosen."""
    return next((p for p in plan.steps if p.step.name in ("step3_ppo", "step2_dpo")), None)


def final_model_dir(plan: Plan) -> Path | None:
    last = final_step(plan)
    if last is None:
        return None
    return last.output_dir / "actor" if last.step.name == "step3_ppo" else last.output_dir


def _last_user(prompt) -> str:
    """The last user turn, noting how many turns came before it."""
    if not isinstance(prompt, list):
        return str(prompt)
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    earlier = sum(m.get("role") in ("user", "assistant") for m in prompt) - 1
    return (users[-1] if users else str(prompt[-1].get("content", ""))) + (
        f" *(after {earlier} earlier turns)*" if earlier > 0 else "")


def cell(text) -> str:
    """A markdown table cell: pipes escaped, line breaks as <br>."""
    return (str(text).strip() or "(empty answer)").replace("|", "\\|").replace("\n", "<br>")


def samples_markdown(records: list[dict], final: str = "RLHF model (step 3)", short: str = "RLHF") -> str:
    out = [f"| prompt (last user turn) | SFT model (step 1) | {final} |", "|---|---|---|"]
    for r in records:
        score = lambda name: f"<br>**score {r[name + '_score']:+.3f}**" if name + "_score" in r else ""  # noqa: E731
        out.append(f"| {cell(_last_user(r['prompt']))} | {cell(r['baseline'])}{score('baseline')} | "
                   f"{cell(r['finetune'])}{score('finetune')} |")
    if records and "baseline_score" in records[0]:
        mean = lambda name: sum(r[name + "_score"] for r in records) / len(records)  # noqa: E731
        out.append(f"\nMean reward-model score on these {len(records)} prompts: SFT {mean('baseline'):+.3f}, "
                   f"{short} {mean('finetune'):+.3f}.")
    return "\n".join(out)


# ---- step 3: the held-out answers, SFT against RLHF --------------------------------------------------------
def eval_cap(flags: dict) -> int:
    """The evaluation's answer cap, as step 3 resolves it (twice the training cap by default)."""
    return int(flags.get("eval_max_answer_seq_len") or 2 * int(flags.get("max_answer_seq_len", 256)))


def heldout_section(p, out: Path, samples: int) -> list[str]:
    """The comparison of the SFT and the RLHF model's held-out answers: table, score-vs-length plot, samples."""
    from chatrlhf.training.step3_ppo import compare

    pair = compare.first_and_last(p.output_dir)
    if pair is None:
        return []
    before, after = pair
    c = compare.compare(before, after)
    cap = eval_cap(p.flags)
    png = out / "report" / "step3_length.png"
    compare.plot_score_vs_length(before, after, png, cap=cap)
    how = "greedy" if p.flags.get("eval_greedy") else "sampled as in training, with the same seed for both models"
    lines = ["## Held-out answers: SFT against RLHF", "",
             f"The same {c.n} held-out prompts, one answer each ({how}; at most {cap} tokens, "
             f"{cap / int(p.flags.get('max_answer_seq_len', cap)):g}x the training cap), scored by the step-2 reward "
             "model.", "",
             "| | SFT model (step 1) | RLHF model (step 3) |", "|---|---|---|",
             f"| mean reward-model score | {c.score[0]:+.3f} | {c.score[1]:+.3f} |",
             f"| mean answer length (tokens) | {c.length[0]:.1f} | {c.length[1]:.1f} ({c.length_change:+.0%}) |",
             f"| answers that end (EOS before the cap) | {c.eos[0]:.2f} | {c.eos[1]:.2f} |", "",
             f"- Score gain, prompt by prompt: **{c.gain:+.3f} +- {c.gain_se:.3f}** (1 SE; {c.z:.1f} SE).",
             f"- At equal length (the gain with the length difference regressed out; one token more is worth "
             f"{c.score_per_token:+.4f}): **{c.gain_at_equal_length:+.3f} +- {c.gain_at_equal_length_se:.3f}**.",
             f"- On the {c.both_ended} prompts where both answers ended before the cap (a cut answer is scored at a "
             f"token that is not an EOS, where the reward model never learned): "
             f"**{c.gain_both_ended:+.3f} +- {c.gain_both_ended_se:.3f}**.", "",
             f"![score against length]({png.relative_to(out).as_posix()})", ""]
    if samples > 0:
        lines += [f"Answers to the first {min(samples, c.n)} of these prompts, as the evaluation sampled them:", "",
                  eval_samples_markdown(before, after, samples), ""]
    return lines


def eval_samples_markdown(before: dict, after: dict, n: int) -> str:
    show = lambda r: (f"{cell(r['answer'])}<br>**score {r['score']:+.3f}**, {r['length']} tokens"  # noqa: E731
                      + ("" if r["eos"] else ", cut at the cap"))
    out = ["| prompt (last user turn) | SFT model (step 1) | RLHF model (step 3) |", "|---|---|---|"]
    for key in sorted(set(before) & set(after))[:n]:
        out.append(f"| {cell(_last_user(before[key]['prompt']))} | {show(before[key])} | {show(after[key])} |")
    return "\n".join(out)


# ---- the report --------------------------------------------------------------------------------------------
def write_report(plan: Plan, results: dict, *, command: str, deployment: str, samples: int,
                 threads: int | None = None) -> Path:
    """Writes `<output>/report.md` (+ PNGs under `<output>/report/`); returns its path."""
    from chatrlhf.training.pipeline.recipes import human_size

    out = plan.output_dir
    rows = summary_rows(plan, results)
    dpo = plan.step2_method == "dpo"
    models = (f"- models: actor `{plan.actor['name']}` ({human_size(plan.actor['num_params'])} parameters), "
              + ("trained by SFT then DPO (no reward model, no PPO)" if dpo else
                 f"reward model `{plan.reward['name']}` ({human_size(plan.reward['num_params'])})"))
    lines = ["# chatrlhf pipeline report", "",
             f"- command: `{command}`",
             models,
             f"- deployment: {deployment}" + (f", {threads} thread(s) per step (a rerun with the same thread count "
                                              "gives the same figures)" if threads else "")
             + f"; recipe: `{plan.recipe}`",
             "- step outputs: " + ", ".join(f"`{p.output_dir}`" for p in plan.steps), "",
             "## Summary", "", markdown_table(rows), "",
             "Before and after are each step's first and last evaluation on its held-out split (\"-\": a step run with "
             "--eval_before_training false): "
             + ("for DPO, on its held-out preference pairs, the implicit reward beta * log(policy / SFT) of the "
                "chosen answer against the rejected one's (before training every reward is 0: a tie, counted "
                "half), the policy's own log-probabilities (do both answers' fall?) and its KL to the SFT model on "
                "the chosen answers." if dpo else
                "for step 3, the SFT model's and the RLHF model's answers (sampled as in training, up to the "
                "evaluation's cap) to the same held-out prompts, scored by the step-2 reward model, with their KL to "
                "the SFT model. For step 2, length alone and the pairs length cannot decide set the accuracy in "
                "context."), ""]
    heldout: list[str] = []
    for p in plan.steps:
        n = p.step.number
        png = out / "report" / f"step{n}.png"
        lines += [f"## Step {n}: {p.step.title}", ""]
        if plot_step(p.step, p.output_dir, png):
            lines += [f"![step {n}]({png.relative_to(out).as_posix()})", ""]
        else:
            lines += ["(no metrics recorded)", ""]
        lines += [f"Log: `{p.log}`; flags: `{p.args_file}`.", ""]
        if p.step.name == "step3_ppo":
            heldout = heldout_section(p, out, samples)
            lines += heldout
    final = final_model_dir(plan)
    if heldout and final is not None:  # step 3's own held-out answers were the samples
        lines += ["Chat with the RLHF model:", "", "```bash", f"python -m chatrlhf.inference.chatbot --path {final}",
                  "```", ""]
    elif samples > 0 and final is not None and (final / "config.json").is_file():
        label, short = ("DPO model (step 2)", "DPO") if dpo else ("RLHF model (step 3)", "RLHF")
        lines += ["## Sample answers on held-out prompts", "",
                  ("Greedy decoding, on prompts of DPO's held-out pairs (no reward model scores them)." if dpo else
                   "Greedy decoding; scores from the step-2 reward model (higher is preferred)."), ""]
        try:
            lines += [samples_markdown(sample_answers(plan, samples), label, short), ""]
        except Exception as e:  # noqa: BLE001 - the report is still useful without samples
            logger.warning("sample answers failed: %s", e)
            lines += [f"(sample answers failed: {type(e).__name__}: {e})", ""]
        lines += [f"Chat with the {short} model:", "", "```bash", f"python -m chatrlhf.inference.chatbot --path {final}",
                  "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
