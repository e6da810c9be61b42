"""`python -m lora_train demo`, the README's first command, runs end to end and says where its files went."""

from __future__ import annotations

from safetensors import safe_open

from lora_train.cli import main


def test_demo_captions_trains_and_reports_its_files(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    lora = tmp_path / "output" / "demo_lora.safetensors"
    assert "captioned 8, skipped 0" in printed and f"LoRA:        {lora.resolve()}" in printed
    assert all(p.read_text().startswith("demo style, ") for p in (tmp_path / "dataset").glob("*.txt"))
    with safe_open(str(lora), "pt") as file:
        assert file.metadata()["ss_output_name"] == "demo_lora"
    assert any((tmp_path / "output" / "logs").iterdir()), "TensorBoard event files"
