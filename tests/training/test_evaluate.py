"""Corpus evaluation equals the mean per-token loss recomputed with transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from checkpoints import hf_model
from helpers import PROMPTS
from noln_core import corpus_loss, tokenize
from noln_core.cli import main


def test_corpus_loss_equals_hf(ln_model, ln_dir):
    tokens = np.array(tokenize(ln_model, " ".join(PROMPTS * 6), prepend_bos=False))
    result = corpus_loss(ln_model, tokens, chunk=32, batch=3)
    n = len(tokens) // 31
    rows = torch.tensor(np.concatenate([np.full((n, 1), 50256), tokens[: n * 31].reshape(n, 31)], 1))
    with torch.no_grad():
        lp = hf_model(ln_dir)(rows).logits[:, :-1].double().log_softmax(-1)
    per_chunk = -lp.gather(-1, rows[:, 1:, None])[..., 0].mean(-1).numpy()
    np.testing.assert_allclose(result.chunk_losses, per_chunk, atol=1e-4)
    assert result.mean_loss == pytest.approx(per_chunk.mean(), abs=1e-4) and result.tokens == n * 31


def test_too_short_text_is_refused(ln_model):
    with pytest.raises(ValueError, match="fewer than one chunk"):
        corpus_loss(ln_model, np.array([1, 2, 3]), chunk=32)


def test_cli_evaluate(tmp_path, capsys, ln_dir, noln_dir):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(PROMPTS * 6))
    assert main(["evaluate", "--model", str(ln_dir), "--model", str(noln_dir), "--data", str(data), "--chunk", "32",
                 "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["ln_free"] for r in doc["results"]] == [False, True] and all(r["mean_loss"] > 0 for r in doc["results"])
    assert main(["evaluate", "--model", str(ln_dir), "--data", str(tmp_path / "none.txt")]) == 2
    assert "is not a file" in capsys.readouterr().err
