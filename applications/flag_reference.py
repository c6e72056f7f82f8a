"""Writes docs/FLAGS.md: every flag of every step, with its default and its docstring, from the config dataclasses.

  python applications/flag_reference.py            # rewrite docs/FLAGS.md
  python applications/flag_reference.py --check    # exit 1 if docs/FLAGS.md is out of date
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from chatrlhf.training.steps import STEPS
from chatrlhf.utils.config import flag_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "FLAGS.md"


def steps():
    return [(f"Step {s.number}: {s.title} (`{s.module}`)", s.config_class()) for s in STEPS.values()]


def render() -> str:
    lines = ["# Flag reference", "",
             "Generated from the config dataclasses by `python applications/flag_reference.py`; do not edit by hand.",
             "Every flag can also be given in a YAML file (`--config file.yaml`, keys without dashes). Boolean flags",
             "take no value to turn on (`--offload`) or `true`/`false`.", ""]
    for title, cls in steps():
        lines += [f"## {title}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for name, (_, _, default, doc) in flag_table(cls).items():
            shown = "(required)" if default is dataclasses.MISSING else f"`{default}`"
            lines.append(f"| `--{name}` | {shown} | {doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            raise SystemExit(f"{DOC} is out of date: run python applications/flag_reference.py")
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
