"""DeepSpeed's collectives through the shared-memory kernel give gloo's results, bit for bit, on two ranks of one
CPU host: all-reduce (SUM) of bf16 and fp32 tensors of odd sizes, up to past the kernel's buffer, and the
all-gather made of an all-reduce of a zeroed buffer, also in place as ZeRO 1-2 call it (-0.0 shards compare equal to the +0.0 they arrive as)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "_shm_two_ranks.py"


@pytest.mark.distributed
def test_two_ranks_shared_memory_collectives_match_gloo(tmp_path, deepspeed_launch):
    out = tmp_path / "shm.json"
    deepspeed_launch(str(SCRIPT), ["--out", out], timeout=600)
    result = json.loads(out.read_text())
    if not result["available"]:
        pytest.skip("DeepSpeed's shared-memory op is not built or not usable on this CPU")
    assert result["installed"]
    for case, same in result["same"].items():
        assert all(same.values()), (case, same)
