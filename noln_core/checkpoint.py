"""Hugging Face GPT-2 checkpoints on disk: the one reader, the one writer, and their checks.

A checkpoint is a directory with ``config.json`` and weights
(``model*.safetensors``, else ``pytorch_model*.bin``).  Everything here runs
*before* anything large is allocated, so that a broken or hostile checkpoint
fails in milliseconds with one actionable line (a :class:`CheckpointConfig` is
validated field by field, the tensor headers are checked against it, the
declared size against the file and against free memory), and no code from a
checkpoint ever runs: safetensors are parsed by hand, ``.bin`` files are
unpickled with ``weights_only=True`` and refused outright when they hold
anything but tensors.

The LN-free format (:data:`TRICK_EPS`, :data:`TRICK_SCALE`): the published
checkpoints keep ordinary ``GPT2LMHeadModel`` weights but store every LayerNorm
weight multiplied by ``1e6`` (divided by the frozen standard deviation) and
``layer_norm_epsilon = 1e12``, so that ``sqrt(var + eps) ~= 1e6`` cancels the
factor.  :data:`LN_FREE_MIN_EPS` is the (much lower) bar at which a loader reads
a checkpoint as LN-free.  :mod:`noln_core.loading` folds the weights;
:mod:`noln_core.training.removal` trains and writes them through this module.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CorruptCheckpointError, NotGPT2Error, UnsafeCheckpointError
from .model import ACTIVATIONS

TRICK_EPS = 1e12
"""``layer_norm_epsilon`` that the LN-free format writes (as the published checkpoints do)."""
TRICK_SCALE = 1e6
"""Factor the LN-free format multiplies every LayerNorm weight by (``sqrt(TRICK_EPS)``)."""
LN_FREE_MIN_EPS = 1e6
"""``layer_norm_epsilon`` at or above which a checkpoint is read as LN-free.

At ``eps = 1e6`` a LayerNorm divides by ``sqrt(var + 1e6) >= 1000``, far above
any residual-stream standard deviation of a working GPT-2, so such a checkpoint
cannot be using its LayerNorms to normalise."""

DEVIATION_WARNING = 1e-3
"""A stored LN-free checkpoint deviating from the exact LN-free model by more than this is flagged."""


def trick_deviation(max_var: float, eps: float) -> float:
    """How far the stored checkpoint (its LayerNorms run with ``eps``) is from the exact LN-free model, relatively,
    for LN inputs of variance up to ``max_var``: ``1 - 1/sqrt(1 + var/eps)``."""
    return float(1.0 - (1.0 + max_var / eps) ** -0.5)


LIMITS = {"n_layer": 1024, "n_head": 1024, "n_embd": 65_536, "vocab_size": 1_000_000, "n_positions": 1_048_576}
"""Upper bounds on config fields: far above any GPT-2 (XL: 48 layers, 25 heads, 1600 wide, 1024 positions)."""

MID_REMOVAL_BUFFERS = ("average_std_buffer", "bos_std_buffer", "is_fake", "mode_buffer", "attn_v_mode_buffer",
                       "real_average_std", "real_bos_std")
"""Fake-LN buffers that the papers' training code (``submarat/removing-layer-norm``) saves mid-removal."""

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_LAYER_KEY = re.compile(r"^h\.(\d+)\.")


@dataclass(frozen=True)
class CheckpointConfig:
    """The validated fields of a GPT-2 ``config.json`` (``raw`` keeps the whole document)."""

    n_layer: int
    n_head: int
    n_embd: int
    n_inner: int
    """The MLP width (``n_inner``, else ``4 * n_embd``)."""
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float
    activation_function: str
    bos_token_id: int | None
    scale_attn_by_inverse_layer_idx: bool
    raw: Mapping[str, Any]

    @property
    def ln_free(self) -> bool:
        """True when the checkpoint carries the LN-neutralising trick (``eps >= LN_FREE_MIN_EPS``)."""
        return self.layer_norm_epsilon >= LN_FREE_MIN_EPS

    def n_parameters(self) -> int:
        """Parameters of the GPT-2 this config declares (tied unembedding counted once)."""
        d, m, L = self.n_embd, self.n_inner, self.n_layer
        per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
        return self.vocab_size * d + self.n_positions * d + L * per_layer + 2 * d

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every GPT-2 tensor (without the ``transformer.`` prefix) and the shape this config implies."""
        d, m = self.n_embd, self.n_inner
        shapes: dict[str, tuple[int, ...]] = {"wte.weight": (self.vocab_size, d), "wpe.weight": (self.n_positions, d),
                                              "ln_f.weight": (d,), "ln_f.bias": (d,)}
        for layer in range(self.n_layer):
            p = f"h.{layer}."
            shapes.update({
                p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                p + "mlp.c_fc.weight": (d, m), p + "mlp.c_fc.bias": (m,),
                p + "mlp.c_proj.weight": (m, d), p + "mlp.c_proj.bias": (d,),
            })
        return shapes

    def layer_norm_keys(self) -> list[str]:
        """The weight of every LayerNorm: ``h.{l}.ln_1``, ``h.{l}.ln_2`` for each layer, then ``ln_f``."""
        return [f"h.{layer}.{ln}.weight" for layer in range(self.n_layer) for ln in ("ln_1", "ln_2")] + ["ln_f.weight"]


def _integer(config: Mapping[str, Any], key: str, name: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            shown = "missing" if value is None else f"{value!r} ({type(value).__name__})"
            raise CorruptCheckpointError(f"{name}: config.json field {key} must be a whole number, not {shown}")
    low, high = 1, LIMITS.get(key, 1 << 40)
    if not low <= value <= high:
        raise CorruptCheckpointError(
            f"{name}: config.json has {key} = {value}, outside {low}..{high:,}; the config is damaged or not a GPT-2's"
        )
    return value


def validate_config(config: Any, name: str) -> CheckpointConfig:
    """Check a parsed ``config.json`` field by field; one line saying what is wrong otherwise.

    Raises:
        NotGPT2Error: another architecture, cross-attention, an unknown activation.
        CorruptCheckpointError: a missing, mistyped or out-of-range field.
    """
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{name}: config.json does not hold a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "gpt2":
        arch = model_type or (archs[0] if isinstance(archs, list) and archs else "unknown")
        raise NotGPT2Error(f"{name} is a {arch!r} model; noLN Explorer analyses GPT-2-architecture checkpoints only "
                           "(model_type 'gpt2')")
    if config.get("add_cross_attention"):
        raise NotGPT2Error(f"{name} is a GPT-2 with cross-attention (an encoder-decoder part); only decoder-only GPT-2 "
                           "is supported")
    act = config.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise NotGPT2Error(f"{name} uses activation {act!r}, which is not one of {', '.join(ACTIVATIONS)}")
    n_layer = _integer(config, "n_layer", name)
    n_head = _integer(config, "n_head", name)
    n_embd = _integer(config, "n_embd", name)
    vocab = _integer(config, "vocab_size", name)
    n_pos = _integer(config, "n_positions", name)
    n_inner = _integer(config, "n_inner", name, 4 * n_embd) if config.get("n_inner") is not None else 4 * n_embd
    if n_embd % n_head:
        raise CorruptCheckpointError(f"{name}: n_embd={n_embd} is not divisible by n_head={n_head}")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise CorruptCheckpointError(f"{name}: config.json field layer_norm_epsilon must be a positive number, "
                                     f"not {eps!r}")
    bos = config.get("bos_token_id")
    bos = bos if isinstance(bos, int) and not isinstance(bos, bool) and 0 <= bos < vocab else None
    return CheckpointConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_inner=n_inner, vocab_size=vocab, n_positions=n_pos,
        layer_norm_epsilon=float(eps), activation_function=act, bos_token_id=bos,
        scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)), raw=config,
    )


def read_config(directory: Path, name: str) -> CheckpointConfig:
    """``directory/config.json``, parsed and validated (:func:`validate_config`)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CorruptCheckpointError(f"{name} has no config.json: a GPT-2 checkpoint needs config.json and its weights")
    if path.stat().st_size > 1_000_000:
        raise CorruptCheckpointError(f"{name}: config.json is {path.stat().st_size:,} bytes, not a model config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CorruptCheckpointError(f"{name}: config.json is not valid JSON ({err}); re-download or repair it") from err
    return validate_config(config, name)


class SafetensorsFile:
    """Reads tensors of a ``.safetensors`` file one at a time with plain reads.

    The format is an 8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, then the raw data.  Reading each
    tensor into fresh memory (instead of memory-mapping the file, as
    ``safetensors.safe_open`` does) keeps the file's pages out of the
    process's resident memory: loading holds the folded weights plus one
    checkpoint tensor, nothing more.
    """

    def __init__(self, path: Path):
        self._fd: int | None = None
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
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
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view, done = memoryview(target.view(-1).view(torch.uint8).numpy()), 0
        while done < end - start:  # one positioned read, repeated only if the kernel returns less
            got = os.preadv(self._fd, [view[done:]], self.base + start + done)
            if got == 0:
                raise ValueError(f"tensor {key} is cut short (truncated download?)")
            done += got
        if out is not None and not direct:
            return out.copy_(target)
        return target

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def _load_bin(path: Path) -> dict:
    """A ``pytorch_model.bin`` state dict, unpickled with ``weights_only=True``; anything but tensors is refused."""
    with warnings.catch_warnings():  # PyTorch's pickle advice is for developers, not for this app's users
        warnings.simplefilter("ignore")
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights_only" in str(err) or "Unsupported global" in str(err) or "Unsupported operand" in str(err):
                raise UnsafeCheckpointError(
                    f"{path.name} holds executable Python objects besides tensors, so it will not be loaded (loading it "
                    "could run code): use a safetensors copy of the model, or re-save the weights as a plain state dict"
                ) from err
            raise


class Checkpoint:
    """A checkpoint's tensors (``transformer.`` prefix stripped), read one at a time.

    safetensors shards are read with :class:`SafetensorsFile`;
    ``pytorch_model.bin`` is unpickled with ``weights_only=True`` (no pickled code runs).
    """

    def __init__(self, directory: Path, name: str):
        directory = Path(directory)
        self.name = name
        self._where: dict[str, Any] = {}
        shards = sorted(directory.glob("model*.safetensors"))
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not shards and not bins:
            raise CorruptCheckpointError(
                f"{name} has no weights (model.safetensors or pytorch_model.bin): "
                "the download is incomplete or the directory is wrong"
            )
        self.files = shards or bins
        try:
            for shard in shards:
                reader = SafetensorsFile(shard)
                for key in reader.entries:
                    self._where[key.removeprefix("transformer.")] = (reader, key)
            for b in [] if shards else bins:
                loaded = _load_bin(b)
                if not isinstance(loaded, dict):
                    raise TypeError(f"{b.name} does not hold a state dict")
                for key, value in loaded.items():
                    if isinstance(value, torch.Tensor):
                        self._where[key.removeprefix("transformer.")] = (None, value)
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # json, struct and torch.load raise many types for a damaged file
            raise self._corrupt(err) from err

    def _corrupt(self, err: BaseException) -> CorruptCheckpointError:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return CorruptCheckpointError(
            f"{self.name}: the weights file is corrupt or truncated ({first}); delete it (or the cached copy) and "
            "download again"
        )

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        reader, ref = self._where[key]
        return reader.entries[ref][1] if reader is not None else tuple(ref.shape)

    def itemsize(self, key: str) -> int:
        reader, ref = self._where[key]
        return reader.entries[ref][0].itemsize if reader is not None else ref.element_size()

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``, written into ``out`` (and returned) when given."""
        reader, ref = self._where[key]
        try:
            if reader is not None:
                return reader.get(ref, out)
            return ref if out is None else out.copy_(ref)
        except Exception as err:
            raise self._corrupt(err) from err


def available_memory() -> int | None:
    """Bytes of memory this process could still take (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_tensors(ckpt: Checkpoint, config: CheckpointConfig, name: str) -> None:
    """Tensor headers against the config, before any data is read.

    The layer count is compared first (so a config declaring a billion layers
    fails at once), then papers'-code mid-removal buffers are refused, then
    every tensor's presence and shape is checked.
    """
    layers = {int(m.group(1)) for k in ckpt.keys() if (m := _LAYER_KEY.match(k))}
    in_file = max(layers) + 1 if layers else 0
    if in_file != config.n_layer:
        raise CorruptCheckpointError(
            f"{name}: config.json declares {config.n_layer} layers but the weights hold {in_file}; weights and config "
            "disagree"
        )
    fake = sorted(k for k in ckpt.keys() if k.rsplit(".", 1)[-1] in MID_REMOVAL_BUFFERS)
    if fake:
        raise CorruptCheckpointError(
            f"{name} was saved mid-removal by the papers' training code (it holds fake-LayerNorm state such as {fake[0]}); "
            "loaded as GPT-2 its LayerNorms would run live, which is not the model being trained: export it in the "
            "LN-free format first (weight x1e6/sigma, eps 1e12), as the papers' remove_layernorm_by_scaling does"
        )
    expected = config.expected_shapes()
    missing = [k for k in expected if k not in ckpt]
    if missing:
        raise CorruptCheckpointError(
            f"{name}: the weights lack {len(missing)} GPT-2 tensors (first: {missing[0]}); the checkpoint is incomplete "
            "or not GPT-2"
        )
    for key, shape in expected.items():
        if ckpt.shape(key) != shape:
            raise CorruptCheckpointError(
                f"{name}: tensor {key} has shape {ckpt.shape(key)}, config.json implies {shape}; weights and config "
                "disagree"
            )


def check_fits(config: CheckpointConfig, name: str, dtype_bytes: int = 4, free: int | None = None) -> int:
    """The bytes the folded model will take; refuse at once when that exceeds the free memory.

    Returns the estimate (float32 folding plus the final ``dtype_bytes`` copy when it differs).
    """
    params = config.n_parameters()
    estimate = params * 4 + (params * dtype_bytes if dtype_bytes != 4 else 0)
    free = available_memory() if free is None else free
    if free is not None and estimate > free:
        raise CorruptCheckpointError(
            f"{name} needs about {estimate / 1e9:.1f} GB to load ({params / 1e6:,.0f}M parameters) but only "
            f"{free / 1e9:.1f} GB of memory is free: pick a smaller model or free memory"
        )
    return estimate


def layer_norm_ratios(ckpt: Checkpoint, config: CheckpointConfig) -> dict[str, float]:
    """For each LayerNorm weight: its root-mean-square divided by ``sqrt(eps)``.

    In the LN-free format every ratio is the LN's effective weight (about 1e6/σ
    times 1e-6, i.e. order 1); a ratio far from 1 means that LN was not
    neutralised, and the stored model's LN there outputs almost nothing.
    """
    root = math.sqrt(config.layer_norm_epsilon)
    return {key.removesuffix(".weight"): float(ckpt.get(key).float().pow(2).mean().sqrt()) / root
            for key in config.layer_norm_keys()}


def write_checkpoint(directory: Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                     half: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in the Hugging Face GPT-2 layout.

    ``state_dict`` uses HF names (``transformer.h.0.attn.c_attn.weight``...; Conv1D
    weights are ``(in, out)``).  With ``half``, matrices of over 100k entries that
    float16 can hold are stored in float16.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().clone() for k, v in state_dict.items()}
    if half:
        tensors = {k: v.half() if v.numel() > 100_000 and v.abs().max() < 6e4 else v for k, v in tensors.items()}
    tmp = directory / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    validate_config(dict(config), str(directory))
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return directory
