"""Load a GPT-2-architecture checkpoint, from the hub or a local directory, ready for analysis.

``load_model`` reads ``config.json`` and the weights (safetensors preferred,
``pytorch_model.bin`` with ``weights_only=True`` otherwise), never runs code
from the repo (no ``trust_remote_code`` anywhere), detects the LN-neutralising
trick from the checkpoint itself and folds every LayerNorm (see
:mod:`noln_core.model`).  Every way a load can fail that a user can cause ends
in a :class:`~noln_core.errors.ModelLoadError` with one actionable line.

Why not TransformerLens' ``TransformerBridge``?  Its ``NormalizationBridge``
always computes ``(x - mean) / sqrt(var + eps)``: with ``eps = 1e12`` the
LN-free checkpoints stay *approximately* LN-free and still report a
``hook_scale`` of about 1e6, and there is no supported switch that turns a
bridge's norm into the identity.  Its hooks are module state, so concurrent
runs on one model need a lock, and booting it costs ~18x an HF load.  We keep
its hook names and cache conventions instead; see the README.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import (
    DEVIATION_WARNING, Checkpoint, check_fits, check_tensors, layer_norm_ratios, read_config, trick_deviation,
)
from .errors import CorruptCheckpointError, ModelLoadError, OfflineError, UnknownModelError
from .model import DTYPES, GPT2Weights, LoadedModel, ModelInfo, fold_checkpoint
from .paths import DEMO_DIR
from .registry import DEMO_PREFIX, REGISTRY, canonical_repo, lookup, parse_spec
from .tokenizer import load_tokenizer

DEVICE_TYPES = ("cpu", "cuda", "mps")
WEIGHT_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
TOKENIZER_PATTERNS = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_PREDOWNLOAD = (
    "pre-download it where there is a network (`hf download {repo}{rev}`) and copy the cache "
    "(~/.cache/huggingface), or point at a local directory holding config.json and the weights"
)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else is checked and returned."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type not in DEVICE_TYPES:
        raise ModelLoadError(f"device {device!r} cannot run these models here: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available() and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available here: use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {device!r} asked for, but Apple MPS is not available here: use --device cpu or auto")
    return dev


def accelerate_on_cpu(device: str = "auto") -> bool:
    """Whether data-parallel work (``accelerate``) runs on the CPU: asked for, forced by ``ACCELERATE_USE_CPU``
    (``accelerate launch --cpu``), or no CUDA here."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return device == "cpu" or flag or not torch.cuda.is_available()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]  # type: ignore[index]
    raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def is_valid_repo_id(repo_id: str) -> bool:
    """The hub's naming pattern: ``name`` or ``owner/name``, letters, digits, ``.-_``, no ``--`` or ``..``."""
    return bool(_REPO_ID.match(repo_id)) and "--" not in repo_id and ".." not in repo_id and not repo_id.endswith(".git")


def looks_like_path(source: str) -> bool:
    """Hub ids have at most one ``/`` and never start with ``/``, ``.`` or ``~``."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    """Download (or find in the cache) the files matching ``patterns``; map hub errors to one line."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    incomplete = getattr(hub_errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x
    rev = f" --revision {revision}" if revision else ""
    what = f"{repo}{'@' + revision if revision else ''}"
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except incomplete as err:
        raise OfflineError(
            f"the cached copy of {what} is incomplete (an interrupted download) and the hub cannot be reached: "
            "reconnect and load again to finish it, or point at a local directory holding config.json and the weights"
        ) from err
    except GatedRepoError as err:
        raise UnknownModelError(f"{repo} is gated: accept its terms on the hub and log in (`hf auth login`)") from err
    except RevisionNotFoundError as err:
        raise UnknownModelError(
            f"{repo} has no revision {revision!r}: check its branches and tags on the hub (noln_core.list_revisions)"
        ) from err
    except RepositoryNotFoundError as err:
        raise UnknownModelError(
            f"no model {repo!r} on the Hugging Face hub (or it is private): check the spelling, e.g. openai-community/gpt2"
        ) from err
    except LocalEntryNotFoundError as err:
        raise OfflineError(
            f"cannot reach the Hugging Face hub and {what} is not cached: " + _PREDOWNLOAD.format(repo=repo, rev=rev)
        ) from err
    except HfHubHTTPError as err:
        raise ModelLoadError(f"the hub refused {repo}: {str(err).splitlines()[0]}") from err
    except OSError as err:  # disk full, permissions
        raise ModelLoadError(f"could not store {repo} in the Hugging Face cache: {err}") from err


def _locate(source: str, revision: str | None, allow_local: bool,
            config_only: bool = False) -> tuple[Path, str, str | None, str | None]:
    """Return ``(directory, source, revision, commit)`` for a shipped demo model, a local dir or a hub repo.

    ``config_only`` fetches nothing but ``config.json`` from the hub (to size a model before loading it).
    """
    if source.startswith(DEMO_PREFIX):
        directory = DEMO_DIR / source.removeprefix(DEMO_PREFIX)
        if source not in REGISTRY or not (directory / "config.json").is_file():
            shipped = ", ".join(spec for spec in REGISTRY if spec.startswith(DEMO_PREFIX))
            raise UnknownModelError(f"no demo model {source!r}: the shipped ones are {shipped}")
        return directory, source, None, None
    expanded = Path(os.path.expanduser(source))
    if expanded.is_dir():
        if not allow_local:
            raise ModelLoadError("local directories are disabled here: choose a model from the registry")
        if revision:
            raise ModelLoadError(f"{source} is a local directory; revisions (@{revision}) apply to hub repos only")
        return expanded.resolve(), str(expanded.resolve()), None, None
    if expanded.exists():
        raise CorruptCheckpointError(f"{source} is a file; give the directory that holds config.json and the weights")
    repo = canonical_repo(source)
    if not is_valid_repo_id(repo):
        if looks_like_path(source):
            raise ModelLoadError(f"no directory {source!r}: give an existing local checkpoint directory or a hub repo id")
        raise UnknownModelError(f"{source!r} is neither a local directory nor a valid hub repo id (owner/name)")
    if revision is None and lookup(repo, None) is not None:
        revision = lookup(repo, None).revision  # type: ignore[union-attr]
    if config_only:
        return _snapshot(repo, revision, ["config.json"]), repo, revision, None
    directory = _snapshot(repo, revision, WEIGHT_PATTERNS + TOKENIZER_PATTERNS)
    if not any(directory.glob("model*.safetensors")):
        directory = _snapshot(repo, revision, BIN_PATTERNS + ["config.json"] + TOKENIZER_PATTERNS)
    commit = directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else None
    return directory, repo, revision, commit


def locate(source: str, revision: str | None = None) -> Path:
    """The local directory of a model: a shipped demo, a local directory, or a hub repo (downloaded or cached)."""
    source, revision = _source_and_revision(source, revision)
    return _locate(source, revision, allow_local=True)[0]


def _source_and_revision(source: str, revision: str | None) -> tuple[str, str | None]:
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError("no model given: name a hub repo id (e.g. openai-community/gpt2) or a local directory")
    source = source.strip()
    if revision is None and not Path(os.path.expanduser(source)).exists():
        source, revision = parse_spec(source)
    return source, revision


def _config_only(source: str, allow_local: bool):
    """A model's parsed ``config.json``, fetched without the weights; the same one-line errors as loading."""
    source, revision = _source_and_revision(source, revision=None)
    directory, source, revision, _ = _locate(source, revision, allow_local, config_only=True)
    return read_config(directory, source)


def context_length(source: str, *, allow_local: bool = True) -> int:
    """A model's context (``n_positions``), from its ``config.json`` alone; the same one-line errors as loading."""
    return _config_only(source, allow_local).n_positions


def estimate_bytes(source: str, device: str = "auto", dtype: str | torch.dtype = "float32", *,
                   allow_local: bool = True) -> int:
    """The memory a model will take once loaded, from its ``config.json`` alone (fetched without the weights).

    Raises the same one-line errors as :func:`load_model` for a bad source or config.
    """
    resolve_device(device)
    itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    config = _config_only(source, allow_local)
    # The folded model drops the LN parameters and adds b_U (one per token) and w_U: an upper bound.
    return (config.n_parameters() + config.vocab_size + config.n_embd) * itemsize


def load_model(
    source: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "float32",
    *,
    allow_local: bool = True,
    name: str | None = None,
) -> LoadedModel:
    """Load a GPT-2-architecture checkpoint and fold its LayerNorms.

    Args:
        source: a hub repo id (``openai-community/gpt2``, ``apollo-research/gpt2_noLN``)
            or a local directory with ``config.json`` and weights.  ``SOURCE@REV`` is
            accepted when ``revision`` is not given.
        revision: branch, tag or commit on the hub (gpt2_noLN: ``v1``..``v5``,
            ``vanilla``...).  gpt2_noLN without one means ``v4``.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        dtype: ``"float32"`` (default: small logit differences need it), ``"bfloat16"``, ``"float16"``.
        allow_local: refuse local directories when False (hosted use).
        name: display name; defaults to the spec.

    Returns:
        A :class:`LoadedModel`; ``model.ln_free`` is True when the checkpoint
        neutralises its LayerNorms, and the model then has none.

    Raises:
        ModelLoadError: (or a subclass) with a one-line message for any bad source.
    """
    source, revision = _source_and_revision(source, revision)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    directory, source, revision, commit = _locate(source, revision, allow_local)
    display = name or (source if revision is None else f"{source}@{revision}")
    config = read_config(directory, display)
    check_fits(config, display, dtype_bytes=torch.empty((), dtype=torch_dtype).element_size())
    ckpt = Checkpoint(directory, display)
    check_tensors(ckpt, config, display)
    tokenizer = load_tokenizer(directory, config.vocab_size, display)

    eps, ln_free = config.layer_norm_epsilon, config.ln_free
    warnings: list[str] = []
    if ln_free:
        off = {ln: r for ln, r in layer_norm_ratios(ckpt, config).items() if not 1e-3 <= r <= 1e3}
        if off:
            first, ratio = next(iter(off.items()))
            warnings.append(
                f"layer_norm_epsilon is {eps:g} but {len(off)} LayerNorm weight(s) are not scaled to match (first: "
                f"{first}, |w|/sqrt(eps) = {ratio:.2g}): this is not the LN-free trick there, and the stored model's "
                "LayerNorm outputs almost nothing"
            )
    bos = config.bos_token_id
    if bos is None:
        bos = tokenizer.token_to_id("<|endoftext|>")
        if bos is None or not 0 <= bos < config.vocab_size:
            bos = config.vocab_size - 1
            warnings.append(f"no BOS token in config or tokenizer; using id {bos}")

    weights = fold_checkpoint(ckpt.get, ckpt.__contains__, config.n_layer, eps, ln_free)
    del ckpt
    # A sum per tensor: NaN or inf anywhere makes it non-finite, without a mask the size of the weights.
    bad = [f for f, t in vars(weights).items() if not math.isfinite(float(t.sum()))]
    if bad:
        raise CorruptCheckpointError(f"{display}: the weights hold NaN or infinite values (in {bad[0]} after folding)")
    moved: dict[int, torch.Tensor] = {}  # by id, so tied embeddings stay one tensor on the device
    try:
        for t in weights.tensors():
            if id(t) not in moved:
                moved[id(t)] = t.to(device=torch_device, dtype=torch_dtype)
    except torch.OutOfMemoryError as err:
        raise ModelLoadError(
            f"{display} does not fit in {torch_device} memory as {dtype}: pick a smaller model, bfloat16, or another device"
        ) from err
    weights = GPT2Weights(**{f: moved[id(t)] for f, t in vars(weights).items()})

    info = ModelInfo(
        name=display, source=source, revision=revision, commit=commit, ln_free=ln_free,
        n_layers=config.n_layer, n_heads=config.n_head, d_model=config.n_embd, d_mlp=config.n_inner,
        n_ctx=config.n_positions, d_vocab=config.vocab_size, eps=eps, act_fn=config.activation_function,
        bos_token_id=int(bos), device=str(torch_device), dtype=str(torch_dtype).removeprefix("torch."),
        warnings=tuple(warnings),
    )
    model = LoadedModel(info=info, weights=weights, tokenizer=tokenizer,
                        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx)
    if ln_free and eps < PROBE_BELOW_EPS:
        deviation = stored_trick_deviation(model)
        if deviation > DEVIATION_WARNING:
            model = replace(model, info=replace(info, warnings=info.warnings + (
                f"the stored eps-{eps:g} checkpoint deviates from the exact LN-free model by {deviation:.1%} already on "
                "a short probe text (its residual variance is not small against eps): numbers from the stored model in "
                "other tools will differ from these",)))
    return model


PROBE_BELOW_EPS = 1e10
"""Checkpoints with a smaller eps are probed at load time.  At ``eps >= 1e10`` the stored model deviates by
``~var/(2 eps)``, above 0.1% only for residual norms beyond ~120,000 (GPT-2's largest are ~3,000): ordinary text
cannot show it, and each run still measures it on its own text (``ModelRun.hf_deviation``)."""
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1, 2, 3:\t\n"
"""A short text run once at load time to measure the stored LN-free checkpoint's deviation."""


def stored_trick_deviation(model: LoadedModel, text: str = PROBE_TEXT) -> float:
    """How far the stored checkpoint (run with its eps LayerNorms, as ``transformers`` does) is from this exact model.

    An LN with input variance ``var`` and the trick's ``eps`` scales its output
    by ``1/sqrt(1 + var/eps)`` instead of 1; this returns the largest relative
    gap ``1 - 1/sqrt(1 + var/eps)`` over every LN input of ``text`` (BOS first).
    0 for models with LN (nothing to compare).
    """
    if not model.ln_free:
        return 0.0
    ids = [model.info.bos_token_id] + model.tokenizer.encode(text, add_special_tokens=False).ids
    last = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
    names = [f"blocks.{layer}.hook_resid_{k}" for layer in range(model.info.n_layers) for k in ("pre", "mid")] + [last]
    seen: list[float] = []
    model.forward(torch.tensor([ids[: model.info.n_ctx]]), observer=lambda _, x: seen.append(
        float(x.float().var(-1, unbiased=False).max())), wants=set(names).__contains__, return_logits=False)
    max_var = max(seen)
    return trick_deviation(max_var, model.info.eps)
