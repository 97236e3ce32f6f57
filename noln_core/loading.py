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

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpointError, ModelLoadError, NotGPT2Error, OfflineError, UnknownModelError
from .model import ACTIVATIONS, GPT2Weights, LoadedModel, ModelInfo, fold_checkpoint
from .registry import DEMO_BASE, DEMO_NOLN, DEMO_PREFIX, REGISTRY, canonical_repo, lookup, parse_spec

NEUTRALISED_EPS = 1e6
"""``layer_norm_epsilon`` at or above this marks the LN-free trick (the published checkpoints use 1e12).

At ``eps = 1e6`` the LN divides by ``sqrt(var + 1e6) >= 1000``, far above any
residual-stream standard deviation of a working GPT-2, so such a checkpoint
cannot be using its LayerNorms to normalise."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
TOKENIZER_PATTERNS = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "data" / "gpt2-tokenizer"
"""GPT-2's vocab.json and merges.txt, for checkpoints that ship no tokenizer."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_PREDOWNLOAD = (
    "pre-download it where there is a network (`huggingface-cli download {repo}{rev}`) and copy the cache "
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available here: use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {device!r} asked for, but Apple MPS is not available here: use --device cpu or auto")
    return dev


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
        raise UnknownModelError(f"{repo} is gated: accept its terms on the hub and log in (`huggingface-cli login`)") from err
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


def _read_config(directory: Path, name: str) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CorruptCheckpointError(f"{name} has no config.json: a GPT-2 checkpoint needs config.json and its weights")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{name}: config.json is not valid JSON ({err}); re-download or repair it") from err
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{name}: config.json does not hold a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "gpt2":
        arch = model_type or (archs[0] if archs else "unknown")
        raise NotGPT2Error(f"{name} is a {arch!r} model; noLN Explorer analyses GPT-2-architecture checkpoints only (model_type 'gpt2')")
    if config.get("add_cross_attention"):
        raise NotGPT2Error(f"{name} is a GPT-2 with cross-attention (an encoder-decoder part); only decoder-only GPT-2 is supported")
    act = config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise NotGPT2Error(f"{name} uses activation {act!r}, which is not one of {', '.join(ACTIVATIONS)}")
    try:
        d, h = int(config["n_embd"]), int(config["n_head"])
        int(config["n_layer"]), int(config["vocab_size"]), int(config["n_positions"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"{name}: config.json lacks or garbles {err}; it is not a complete GPT-2 config") from err
    if d % h:
        raise CorruptCheckpointError(f"{name}: n_embd={d} is not divisible by n_head={h}")
    return config


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _SafetensorsFile:
    """Reads tensors of a ``.safetensors`` file one at a time with plain reads.

    The format is an 8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, then the raw data.  Reading each
    tensor into fresh memory (instead of memory-mapping the file, as
    ``safetensors.safe_open`` does) keeps the file's pages out of the
    process's resident memory: loading holds the folded weights plus one
    checkpoint tensor, nothing more.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header")
            n = int.from_bytes(raw, "little")
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(meta.get("dtype"))
            if dtype is None:
                raise ValueError(f"tensor {key} has unsupported dtype {meta.get('dtype')!r}")
            shape = tuple(int(x) for x in meta["shape"])
            start, end = (int(x) for x in meta["data_offsets"])
            if not 0 <= start <= end <= size - self.base or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key} lies outside the file or has the wrong size (truncated download?)")
            self.entries[key] = (dtype, shape, start, end)

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``; read straight into ``out`` when it has the same dtype and shape."""
        dtype, shape, start, end = self.entries[key]
        direct = out is not None and out.dtype == dtype and tuple(out.shape) == shape and out.is_contiguous()
        target = out if direct else torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.base + start)
            if f.readinto(target.view(-1).view(torch.uint8).numpy()) != end - start:
                raise ValueError(f"tensor {key} is cut short (truncated download?)")
        if out is not None and not direct:
            return out.copy_(target)
        return target


class _Checkpoint:
    """Access to a checkpoint's tensors (``transformer.`` prefix stripped), read one at a time.

    safetensors shards are read with :class:`_SafetensorsFile`;
    ``pytorch_model.bin`` is loaded with ``weights_only=True`` (no pickled code runs).
    """

    def __init__(self, directory: Path, name: str):
        self.name = name
        self._where: dict[str, Any] = {}
        shards = sorted(directory.glob("model*.safetensors"))
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not shards and not bins:
            raise CorruptCheckpointError(
                f"{name} has no weights (model.safetensors or pytorch_model.bin): "
                "the download is incomplete or the directory is wrong"
            )
        try:
            for shard in shards:
                reader = _SafetensorsFile(shard)
                for key in reader.entries:
                    self._where[key.removeprefix("transformer.")] = (reader, key)
            for b in [] if shards else bins:
                loaded = torch.load(str(b), map_location="cpu", weights_only=True)
                if not isinstance(loaded, dict):
                    raise TypeError(f"{b.name} does not hold a state dict")
                for key, value in loaded.items():
                    if isinstance(value, torch.Tensor):
                        self._where[key.removeprefix("transformer.")] = (None, value)
        except Exception as err:  # json, struct and torch.load raise many types for a damaged file
            raise self._corrupt(err) from err

    def _corrupt(self, err: BaseException) -> CorruptCheckpointError:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return CorruptCheckpointError(
            f"{self.name}: the weights file is corrupt or truncated ({first}); delete it (or the cached copy) and download again"
        )

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        reader, ref = self._where[key]
        return reader.entries[ref][1] if reader is not None else tuple(ref.shape)

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``, written into ``out`` (and returned) when given."""
        reader, ref = self._where[key]
        try:
            if reader is not None:
                return reader.get(ref, out)
            return ref if out is None else out.copy_(ref)
        except Exception as err:
            raise self._corrupt(err) from err


def _check_checkpoint(ckpt: _Checkpoint, config: dict[str, Any], name: str) -> None:
    """Every GPT-2 tensor is present with the shape config.json implies (read from headers, not data)."""
    d, n_layers, vocab, n_ctx = config["n_embd"], config["n_layer"], config["vocab_size"], config["n_positions"]
    d_mlp = config.get("n_inner") or 4 * d
    expected = {"wte.weight": (vocab, d), "wpe.weight": (n_ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for layer in range(n_layers):
        p = f"h.{layer}."
        expected.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "mlp.c_fc.weight": (d, d_mlp), p + "mlp.c_fc.bias": (d_mlp,),
            p + "mlp.c_proj.weight": (d_mlp, d), p + "mlp.c_proj.bias": (d,),
        })
    missing = [k for k in expected if k not in ckpt]
    if missing:
        raise CorruptCheckpointError(
            f"{name}: the weights lack {len(missing)} GPT-2 tensors (first: {missing[0]}); the checkpoint is incomplete or not GPT-2"
        )
    for key, shape in expected.items():
        if ckpt.shape(key) != shape:
            raise CorruptCheckpointError(
                f"{name}: tensor {key} has shape {ckpt.shape(key)}, config.json implies {shape}; weights and config disagree"
            )


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _tokenizer_from_files(files: tuple[tuple[str, int, int], ...]):
    """Build (once per set of files) a GPT-2 byte-level BPE tokenizer; ``Tokenizer`` is safe to share."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    paths = [f[0] for f in files]
    if len(paths) == 1:
        return Tokenizer.from_file(paths[0])
    tok = Tokenizer(models.BPE.from_file(*paths))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id("<|endoftext|>") is not None:  # as GPT-2's own tokenizer treats it
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok


def load_tokenizer(directory: Path | None, vocab_size: int, name: str):
    """A ``tokenizers.Tokenizer`` from the checkpoint's files, else GPT-2's (all these models share it)."""
    candidates = [directory] if directory is not None else []
    for attempt in range(2):
        for folder in candidates:
            for files in (["tokenizer.json"], ["vocab.json", "merges.txt"]):
                if all((folder / f).is_file() for f in files):
                    try:
                        return _tokenizer_from_files(tuple(_file_key(folder / f) for f in files))
                    except Exception as err:  # tokenizers raises plain Exception subclasses
                        raise CorruptCheckpointError(f"{name}: {' and '.join(files)} unreadable ({err})") from err
        if attempt == 0:
            if vocab_size != 50257:
                break
            # No tokenizer files: fine-tunes often ship none.  They use GPT-2's own, which we ship.
            candidates = [BUNDLED_TOKENIZER]
    raise CorruptCheckpointError(
        f"{name} ships no tokenizer (tokenizer.json, or vocab.json + merges.txt) and its vocabulary of {vocab_size} is not GPT-2's"
    )


def _locate(source: str, revision: str | None, allow_local: bool) -> tuple[Path, str, str | None, str | None]:
    """Return ``(directory, source, revision, commit)`` for a shipped demo model, a local dir or a hub repo."""
    if source.startswith(DEMO_PREFIX):
        from .demo import DEMO_DIR

        directory = DEMO_DIR / source.removeprefix(DEMO_PREFIX)
        if source not in REGISTRY or not (directory / "config.json").is_file():
            raise UnknownModelError(f"no demo model {source!r}: the shipped ones are {DEMO_BASE} and {DEMO_NOLN}")
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
    directory = _snapshot(repo, revision, WEIGHT_PATTERNS + TOKENIZER_PATTERNS)
    if not any(directory.glob("model*.safetensors")):
        directory = _snapshot(repo, revision, BIN_PATTERNS + ["config.json"] + TOKENIZER_PATTERNS)
    commit = directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else None
    return directory, repo, revision, commit


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
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError("no model given: name a hub repo id (e.g. openai-community/gpt2) or a local directory")
    source = source.strip()
    if revision is None and not Path(os.path.expanduser(source)).exists():
        source, revision = parse_spec(source)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    directory, source, revision, commit = _locate(source, revision, allow_local)
    display = name or (source if revision is None else f"{source}@{revision}")
    config = _read_config(directory, display)
    ckpt = _Checkpoint(directory, display)
    _check_checkpoint(ckpt, config, display)
    tokenizer = load_tokenizer(directory, int(config["vocab_size"]), display)

    eps = float(config.get("layer_norm_epsilon", 1e-5))
    ln_free = eps >= NEUTRALISED_EPS
    warnings: list[str] = []
    if ln_free:
        ln_rms = torch.stack([ckpt.get(f"h.{i}.ln_1.weight").float().pow(2).mean().sqrt() for i in range(config["n_layer"])])
        ratio = float(ln_rms.median()) / math.sqrt(eps)
        if not 1e-3 <= ratio <= 1e3:
            warnings.append(
                f"layer_norm_epsilon is {eps:g} but the LN weights are not scaled to match (median |w|/sqrt(eps) = {ratio:.2g}):"
                " this does not look like the LN-free trick, and the stored model's LayerNorms output almost nothing"
            )
    bos = config.get("bos_token_id")
    if not isinstance(bos, int) or not 0 <= bos < int(config["vocab_size"]):
        bos = tokenizer.token_to_id("<|endoftext|>")
        if bos is None:
            bos = int(config["vocab_size"]) - 1
            warnings.append(f"no BOS token in config or tokenizer; using id {bos}")

    weights = fold_checkpoint(ckpt.get, ckpt.__contains__, int(config["n_layer"]), eps, ln_free)
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

    d = int(config["n_embd"])
    info = ModelInfo(
        name=display, source=source, revision=revision, commit=commit, ln_free=ln_free,
        n_layers=int(config["n_layer"]), n_heads=int(config["n_head"]), d_model=d,
        d_mlp=int(config.get("n_inner") or 4 * d), n_ctx=int(config["n_positions"]),
        d_vocab=int(config["vocab_size"]), eps=eps, act_fn=config.get("activation_function", "gelu_new"),
        bos_token_id=int(bos), device=str(torch_device), dtype=str(torch_dtype).removeprefix("torch."),
        warnings=tuple(warnings),
    )
    return LoadedModel(
        info=info, weights=weights, tokenizer=tokenizer,
        scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
    )
