"""Synthetic arithmetic word problems from a seed: a verifiable task with a measurable skill for CPU demos.

GSM8K is out of reach for a 135M model on this CPU: SmolLM2-135M-Instruct answered 0 of 16 GSM8K problems right
(greedy, 200 new tokens, about 48 s per problem on the shared 2-core machine), where it solves about a quarter of
these one- and two-step problems with small numbers (greedy, 32 new tokens) and is far from solving them all.
Each record is `{"prompt": question + instruction, "chosen": a worked answer ending in "#### n", "answer": "n"}`:
the prompt_chosen_rejected format, with `answer` travelling as metadata to `verifiable.final_number_match`.

  python -m chatrlhf.training.step3_ppo.arithmetic --n 3000 --seed 0 --out problems.jsonl.gz   # the bundled file
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kofi", "Lena", "Mia",
         "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "cards", "shells", "stamps",
         "balloons", "candies", "flowers", "toy cars", "eggs", "buttons"]
INSTRUCTION = "Answer briefly and end with: #### <number>"


def _templates(rng: random.Random, name: str, items: str) -> list[tuple[str, str, int]]:
    """(question, worked answer, result) candidates with fresh numbers."""
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    c = rng.randint(2, min(9, a + b - 1))  # the two-step result stays positive
    small, per = rng.randint(2, 9), rng.randint(2, 12)
    big = a + b
    return [
        (f"{name} has {a} {items}. {name} gets {b} more {items}. How many {items} does {name} have now?",
         f"{name} has {a} + {b} = {a + b} {items}.", a + b),
        (f"{name} had {big} {items} and gave {b} of them away. How many {items} does {name} have left?",
         f"{name} has {big} - {b} = {a} {items} left.", a),
        (f"{name} buys {small} bags with {per} {items} in each bag. How many {items} does {name} buy?",
         f"{name} buys {small} x {per} = {small * per} {items}.", small * per),
        (f"{name} has {a} {items}, finds {b} more and then loses {c}. How many {items} does {name} have now?",
         f"{name} has {a} + {b} - {c} = {a + b - c} {items}.", a + b - c),
        (f"{name} shares {small * per} {items} equally among {small} friends. How many {items} does each friend get?",
         f"Each friend gets {small * per} / {small} = {per} {items}.", per),
    ]


def problems(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems, the same for the same seed."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        question, worked, result = rng.choice(_templates(rng, rng.choice(NAMES), rng.choice(ITEMS)))
        if question in seen:
            continue
        seen.add(question)
        out.append({"prompt": f"{question}\n{INSTRUCTION}", "chosen": f"{worked}\n#### {result}",
                    "answer": str(result)})
    return out


def write(path: Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in problems(n, seed))
    if path.name.endswith(".gz"):
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes for the same problems
            f.write(lines.encode())
    else:
        path.write_text(lines)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help=".jsonl or .jsonl.gz file to write")
    args = parser.parse_args(argv)
    print(write(Path(args.out), args.n, args.seed))


if __name__ == "__main__":
    main()
