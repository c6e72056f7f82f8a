"""Helpers for the data tests: small files written on the fly and a tokenizer copy with a pad token."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

ALPACA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"


def write_records(path: Path, records: list) -> Path:
    """Writes `records` in the format the suffix names (.json, .jsonl, .json.gz, .jsonl.gz, .parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    text = json.dumps(records) if ".json." in name or name.endswith(".json") else \
        "".join(json.dumps(r) + "\n" for r in records)
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def pairs(n: int, start: int = 0) -> list[dict]:
    """n distinct {prompt, chosen, rejected} records."""
    return [{"prompt": f"question number {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
            for i in range(start, start + n)]


@pytest.fixture
def write():
    return write_records


@pytest.fixture
def make_pairs():
    return pairs


@pytest.fixture(scope="session")
def hh50(tmp_path_factory, hh_rlhf_path) -> Path:
    """The first 50 real HH-RLHF records as a .jsonl.gz file."""
    with gzip.open(hh_rlhf_path, "rt", encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(50)]
    return write_records(tmp_path_factory.mktemp("hh") / "hh50.jsonl.gz", records)


@pytest.fixture(scope="session")
def alpaca_path() -> Path:
    if not ALPACA.exists():
        pytest.skip(f"real data not found at {ALPACA}")
    return ALPACA

