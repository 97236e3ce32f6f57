from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; tests never touch the network
if "NOLN_CACHE_DIR" not in os.environ:  # results kept between runs (neuron means) go to a folder of the test run
    import tempfile

    os.environ["NOLN_CACHE_DIR"] = tempfile.mkdtemp(prefix="noln-test-cache-")

from checkpoints import exploding_gpt2, neutralise, random_gpt2, save  # noqa: E402


@pytest.fixture(scope="session")
def ln_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with LayerNorm (random LN parameters)."""
    return save(random_gpt2(seed=1), tmp_path_factory.mktemp("ckpt") / "tiny-ln")


@pytest.fixture(scope="session")
def noln_dir(tmp_path_factory) -> Path:
    """The same tiny GPT-2 neutralised as the published LN-free checkpoints are."""
    return save(neutralise(random_gpt2(seed=1)), tmp_path_factory.mktemp("ckpt") / "tiny-noln")


@pytest.fixture(scope="session")
def exploding_dir(tmp_path_factory) -> Path:
    """An LN-free tiny GPT-2 doctored to explode (losses of millions of nats) on a few tokens of the demo text."""
    return save(exploding_gpt2(), tmp_path_factory.mktemp("ckpt") / "tiny-exploding")


@pytest.fixture(scope="session")
def ln_model(ln_dir):
    from noln_core import load_model

    return load_model(str(ln_dir), device="cpu")


@pytest.fixture(scope="session")
def noln_model(noln_dir):
    from noln_core import load_model

    return load_model(str(noln_dir), device="cpu")
