"""`python -m lora_train bench gpu --tiny`: every part's rows in the table and the JSON, the out-of-memory check
skipped on the CPU with its reason; a missing package is named in the rows that need it."""

from __future__ import annotations

import json
import re

from lora_train.bench_gpu_parts import unmet
from lora_train.cli import main

PARTS = ["sd15 64px fp16", "sd15 64px fp16 ckpt", "sd15 64px bf16", "sd15 64px bf16 ckpt", "sdxl 64px fp16 ckpt unet"]


def test_bench_gpu_tiny_prints_every_row_and_writes_the_json(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "gpu", "--tiny", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for part in PARTS:
        for loop in ("floor", "ours", "reference"):
            assert re.search(rf"^{re.escape(part)}\s+{loop}\s+ok\s+\d+\.\d{{3}}\s+n/a \(cpu\)", printed, re.M), printed
    assert re.search(r"^check\s+fp16 vs fp32\s+ok\s+loss fp32 \d\.\d+, fp16", printed, re.M), printed
    assert re.search(r"^check\s+resume\s+ok\s+steps 4/4, max relative loss difference 0\.0e\+00", printed, re.M)
    assert re.search(r"^check\s+out of memory\s+skipped\s+needs a GPU", printed, re.M), printed
    written = json.loads(out.read_text())
    assert written["mode"] == "tiny" and len(written["rows"]) == 3 * len(PARTS) + 3
    ours = [row for row in written["rows"] if row["item"] == "ours"]
    assert all(row["estimate_bytes"] > 0 and "peak_bytes" not in row for row in ours)
    assert all(len(row["losses"]) == 2 for row in ours)


def test_a_missing_package_is_named_with_the_fix():
    found = {"diffusers": "missing: No module named 'diffusers'", "peft": "0.7.1"}
    assert unmet(("peft",), found) == ""
    assert unmet(("diffusers", "peft"), found).startswith("diffusers missing: No module named 'diffusers'; install")
