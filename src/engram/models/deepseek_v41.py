"""DeepSeek-V4.1's Engram without its backbone: the Engram tensors of a V4.1-format checkpoint, loaded for reading.

A checkpoint folder holds ``config.json`` (the Engram keys of :meth:`EngramConfig.from_hf_config`, plus the
backbone's ``hidden_size`` and ``hc_mult``, at the top level or in ``text_config``) and the weights, in one
``model.safetensors`` or in shards named by ``model.safetensors.index.json`` (``weight_map``). Per Engram layer
``L`` six tensors are read, nothing else (shapes of V4.1-Flash: hidden 5120, M = 4 mHC branches, 24 heads of 256):

- ``layers.{L}.engram.embed.weight`` F8_E4M3 ``[rows, head_dim]`` and ``embed.scale`` F8_E8M0
  ``[rows, head_dim / 32]``: the table, as packed FP8 rows (:mod:`engram.kernels.fp8`); ``rows`` must be the sum of the
  layer's prime table sizes (``engram_num_embeddings``);
- ``layers.{L}.engram.wkv.weight`` F8_E4M3 ``[(M + 1) * hidden, heads * head_dim]`` with ``wkv.scale`` F8_E8M0,
  one per 32x32 block: ``value_key_proj.weight``, the M keys (one per branch) then the shared value;
- ``layers.{L}.engram.q_weight`` and ``k_weight``, float ``[M, hidden]``: ``query_norm.weight`` and
  ``key_norm.weight``.

``q``/``k`` follow the demo's gate ``<RMSNorm_k(k_m), RMSNorm_q(h_m)>``: the query is the hidden state, the key
comes from the memory. Tables (about 100 GB a layer in V4.1) are read in chunks through safetensors' lazy slices
and packed straight into the uint8 rows the lookups dequantise; no fp32 copy of a table is ever made. The packed
rows live on the device, or (``table_placement`` ``"host"``/``"disk"``) in a table file converted once per layer
into ``table_dir`` and reused by later loads (:func:`load_deepseek_v41_engram`). ``wkv`` is
dequantised whole (``dtype``, bf16 by default: bf16 has more mantissa bits than E4M3 and fp32's exponent
range, so it holds E4M3 times a power-of-two scale exactly unless the scale is near 2^-127 or 2^127).

Gates need the backbone's hidden states at the Engram layers, which an Engram-only load does not compute: pass
them to :meth:`DeepSeekV41Engram.forward`. Row ids and rows need only the token ids (:meth:`DeepSeekV41Engram.lookup`).
The image token (``image_token_id`` of ``config.json``, else 129264) is dead wherever it appears, and the gate's
RMSNorm eps is ``rms_norm_eps`` of ``config.json`` (:meth:`EngramConfig.from_hf_config`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.kernels.fp8 import FP8_SCALE_BLOCK, dequantize_blocks, pack_rows, packed_row_bytes
from engram.layer import Engram
from engram.storage import TableFileError, open_table_store, write_table
from engram.storage.placement import PLACEMENTS
from engram.storage.store import TableStore
from engram.storage.table_file import read_header
from engram.tokenizer import CompressedTokenizer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER = "deepseek-v4"
BACKBONE_KEYS = {"hidden_size": "the backbone width D", "hc_mult": "the mHC branches M"}  # config keys the layer needs
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Suffix of each tensor after ``layers.{L}.engram.``: its safetensors dtypes.
ENGRAM_TENSORS: dict[str, tuple[str, ...]] = {
    "embed.weight": ("F8_E4M3",), "embed.scale": ("F8_E8M0",), "wkv.weight": ("F8_E4M3",), "wkv.scale": ("F8_E8M0",),
    "q_weight": FLOAT_DTYPES, "k_weight": FLOAT_DTYPES,
}
_ENGRAM_NAME = re.compile(r"layers\.(\d+)\.engram\.(.+)")
_PACK_ROWS = 1 << 18  # table rows read and packed at once (69 MB of V4.1 rows)
_SOURCE_KEY = "engram_v41_source"  # a converted table file's metadata: the checkpoint files it was made from


def engram_tensor(layer_id: int, suffix: str) -> str:
    """The checkpoint name of one Engram tensor, e.g. ``layers.1.engram.wkv.weight`` for ``(1, "wkv.weight")``."""
    return f"layers.{layer_id}.engram.{suffix}"


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``path/config.json``, parsed."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{str(path)!r} is not a DeepSeek-V4.1 checkpoint folder: it has no {CONFIG_FILE}")
    config = json.loads(file.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def read_text_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``text_config`` of ``path/config.json`` (the whole file when it has none)."""
    config = read_config(path)
    text = config.get("text_config", config)
    if not isinstance(text, dict):
        raise ValueError(f"text_config of {Path(path) / CONFIG_FILE} must be a JSON object, got "
                         f"{type(text).__name__}")
    return text


def read_engram_config(path: str | os.PathLike[str], tokenizer: str = TOKENIZER) -> EngramConfig:
    """:meth:`EngramConfig.from_hf_config` of ``path/config.json`` (variant ``"deepseek-v4.1"``)."""
    return EngramConfig.from_hf_config(read_config(path), tokenizer=tokenizer)


def backbone_dims(text_config: Mapping[str, Any], hidden_size: int | None = None, hc_mult: int | None = None
                  ) -> tuple[int, int]:
    """``(hidden_size, hc_mult)``: the arguments when given, else the config's keys of the same names."""
    dims = []
    for (key, meaning), given in zip(BACKBONE_KEYS.items(), (hidden_size, hc_mult)):
        if given is None and key not in text_config:
            raise ValueError(f"config has no {key!r} ({meaning}, which the Engram layer needs): pass {key}= "
                             "to the loader")
        value = int(given if given is not None else text_config[key])
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
        dims.append(value)
    return dims[0], dims[1]


def checkpoint_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a checkpoint folder: the index's ``weight_map``, else every tensor of
    ``model.safetensors``."""
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map object")
        files = {name: folder / file for name, file in weight_map.items()}
        for name, file in files.items():
            if not file.is_file():
                raise ValueError(f"{index} maps tensor {name} to {file.name}, which is not in {folder}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"{str(path)!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def check_engram_tensors(files: Mapping[str, Path], cfg: EngramConfig, layers: Iterable[int]) -> None:
    """Refuse (``ValueError`` naming the tensor and file) an Engram tensor this format does not have, one of a
    layer ``cfg`` has no Engram at, and a missing tensor of the ``layers`` to load."""
    for name, file in files.items():
        match = _ENGRAM_NAME.fullmatch(name)
        if match is None:
            continue
        if match.group(2) not in ENGRAM_TENSORS:
            raise ValueError(f"unexpected Engram tensor {name} in {file.name}: a DeepSeek-V4.1 Engram layer holds "
                             f"{sorted(ENGRAM_TENSORS)}")
        if int(match.group(1)) not in cfg.layer_ids:
            raise ValueError(f"tensor {name} in {file.name} is at layer {match.group(1)}, but config.json's "
                             f"engram_layer_ids are {cfg.layer_ids}")
    for layer_id in layers:
        for suffix in ENGRAM_TENSORS:
            if engram_tensor(layer_id, suffix) not in files:
                raise ValueError(f"the checkpoint has no tensor {engram_tensor(layer_id, suffix)} (Engram layer "
                                 f"{layer_id}; its files: {sorted({file.name for file in files.values()})})")


@dataclass(frozen=True)
class TableRead:
    """What one Engram layer reads for ``[B, T]`` tokens."""

    row_ids: Tensor  # int64 [B, T, H] rows of the layer's flat table (head offsets included)
    values: Tensor  # fp32 [B, T, H, head_dim] the dequantised rows


class DeepSeekV41Engram(nn.Module):
    """The Engram layers of a DeepSeek-V4.1 checkpoint, sharing one hasher (:func:`load_deepseek_v41_engram`).

    Every method takes original token ids ``[B, T]``; positions holding one of ``cfg.dead_token_ids`` (the image
    token, and any given at load) are dead, and so are those of a ``dead_mask`` ``[B, T]`` bool (True = dead):
    they are hashed as pad by every look-back that reaches them and get gate 0. ``history``
    (:meth:`NgramHasher.next_history`) continues a sequence hashed before. The parameters are frozen.

    Attributes:
        cfg: the Engram config read from ``config.json`` (all of its layers, also those not loaded).
        hasher: the :class:`NgramHasher` of every layer (of ``cfg``).
        engrams: ``{str(layer_id): Engram}`` of the loaded layers (index with ``self[layer_id]``).
    """

    def __init__(self, cfg: EngramConfig, hasher: NgramHasher, engrams: Mapping[int, Engram]):
        super().__init__()
        self.cfg = cfg
        self.hasher = hasher
        self.engrams = nn.ModuleDict({str(layer_id): engram for layer_id, engram in engrams.items()})
        self.requires_grad_(False)

    @property
    def dead_token_ids(self) -> frozenset[int]:
        """Token ids that are always dead."""
        return frozenset(self.cfg.dead_token_ids)

    @property
    def layer_ids(self) -> list[int]:
        """The loaded Engram layers, in config order."""
        return [int(layer_id) for layer_id in self.engrams]

    def __getitem__(self, layer_id: int) -> Engram:
        if str(layer_id) not in self.engrams:
            raise KeyError(f"layer {layer_id} is not a loaded Engram layer (loaded: {self.layer_ids})")
        return self.engrams[str(layer_id)]

    def hash(self, input_ids: Tensor, dead_mask: Tensor | None = None, history: Tensor | None = None
             ) -> dict[int, Tensor]:
        """``{layer_id: int64 [B, T, H]}`` row ids inside each head's table, of the loaded layers."""
        rows = self.hasher.hash_all(input_ids, history, dead_mask=dead_mask)
        return {layer_id: rows[layer_id] for layer_id in self.layer_ids}

    @torch.no_grad()
    def lookup(self, input_ids: Tensor, dead_mask: Tensor | None = None, history: Tensor | None = None
               ) -> dict[int, TableRead]:
        """What every loaded layer reads for ``input_ids`` ``[B, T]``: flat row ids and dequantised rows.

        Example:
            >>> reads = engram.lookup(torch.tensor([[0, 100, 2000]]))          # doctest: +SKIP
            >>> reads[14].row_ids.shape, reads[14].values.shape                # doctest: +SKIP
            (torch.Size([1, 3, 24]), torch.Size([1, 3, 24, 256]))
        """
        reads = {}
        for layer_id, row_ids in self.hash(input_ids, dead_mask, history).items():
            engram = self[layer_id]
            table = engram.multi_head_embedding
            row_ids = row_ids.to(table.offsets.device)
            values = engram.memory(row_ids).unflatten(-1, (table.num_heads, table.head_dim))
            reads[layer_id] = TableRead(table.flat_row_ids(row_ids), values.float())
        return reads

    @torch.no_grad()
    def forward(self, hidden_states: Tensor, input_ids: Tensor, layer_id: int, dead_mask: Tensor | None = None,
                history: Tensor | None = None, return_gates: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The hidden state after Engram layer ``layer_id``: ``[B, T, M, D]`` -> same shape and dtype.

        Args:
            hidden_states: the backbone's mHC streams entering block ``layer_id`` (before its attention).
            input_ids: ``[B, T]`` the original token ids of those positions.
            layer_id: a loaded Engram layer.
            dead_mask, history: see the class docstring.
            return_gates: also return the gates ``[B, T, M]`` fp32 (0 at dead positions).
        """
        engram = self[layer_id]
        dead = self.hasher.dead_positions(input_ids, dead_mask)
        hash_ids = self.hasher.hash(input_ids, layer_id, history, dead_mask=dead).to(hidden_states.device)
        delta, gates = engram(hidden_states, hash_ids=hash_ids, dead_mask=dead, return_gates=True)
        updated = engram.residual(hidden_states, delta)
        return (updated, gates) if return_gates else updated


class _Reader:
    """Lazy slices of a checkpoint's tensors (files opened on first use, closed with the reader)."""

    def __init__(self, files: Mapping[str, Path]):
        self.files = files
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def slice(self, name: str) -> Any:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="pt"))
        return self._handles[file].get_slice(name)

    def checked(self, name: str, shape: tuple[int, ...], what: str) -> Any:
        """The slice of ``name``, refused unless of one of its format's dtypes and of ``shape``."""
        tensor = self.slice(name)
        dtype, found = tensor.get_dtype(), tuple(tensor.get_shape())
        allowed = ENGRAM_TENSORS[_ENGRAM_NAME.fullmatch(name).group(2)]
        if dtype not in allowed:
            raise ValueError(f"tensor {name} in {self.files[name].name} is {dtype}, expected {' or '.join(allowed)}")
        if found != shape:
            raise ValueError(f"tensor {name} in {self.files[name].name} has shape {list(found)}, expected "
                             f"{list(shape)} ({what})")
        return tensor


def _table_slices(reader: _Reader, layer_id: int, rows: int, head_dim: int) -> tuple[Any, Any]:
    """The layer's lazy ``embed.weight`` E4M3 ``[rows, head_dim]`` and ``embed.scale`` UE8M0
    ``[rows, head_dim / 32]`` slices, checked."""
    weight = reader.checked(engram_tensor(layer_id, "embed.weight"), (rows, head_dim),
                            f"[rows, head_dim]; rows = {rows}, the sum of layer {layer_id}'s prime table sizes")
    scale = reader.checked(engram_tensor(layer_id, "embed.scale"), (rows, head_dim // FP8_SCALE_BLOCK),
                           f"[rows, head_dim / {FP8_SCALE_BLOCK}]")
    return weight, scale


def _pack_table(weight: Any, scale: Any, out: Tensor) -> Tensor:
    """Pack the slices' rows into ``out`` (uint8 ``[rows, head_dim + head_dim / 32]``, any device or a file map)
    ``_PACK_ROWS`` at a time; returns ``out``."""
    for start in range(0, out.shape[0], _PACK_ROWS):
        stop = min(start + _PACK_ROWS, out.shape[0])
        out[start:stop] = pack_rows(weight[start:stop], scale[start:stop]).to(out.device)
    return out


def converted_table_name(layer_id: int) -> str:
    """The file an Engram layer's table is converted into for placement ``host`` or ``disk``."""
    return f"engram-v41-layer-{layer_id}.safetensors"


def _table_source(files: Mapping[str, Path], layer_id: int) -> str:
    """What a converted table is made of, as recorded in its file: per tensor, the name, size and mtime (ns) of the
    checkpoint file holding it (cheap to check; a rewritten or replaced checkpoint file changes it)."""
    source = {}
    for suffix in ("embed.weight", "embed.scale"):
        file = files[engram_tensor(layer_id, suffix)]
        stat = file.stat()
        source[suffix] = {"file": file.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return json.dumps(source, sort_keys=True)


def _is_converted(file: Path, rows: int, width: int, source: str) -> bool:
    """Whether ``file`` is a complete table file of ``[rows, width]`` packed FP8 rows converted from ``source``."""
    try:
        header = read_header(file)
    except (FileNotFoundError, TableFileError):
        return False
    return (header.row_format == "fp8" and (header.num_rows, header.dim) == (rows, width)
            and header.metadata.get(_SOURCE_KEY) == source)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _convert_table(weight: Any, scale: Any, file: Path, layer_id: int, source: str) -> None:
    """Write the slices' rows as a packed FP8 table file (atomically), packed chunk by chunk into a scratch file
    beside it (memory-mapped, so the table never sits in memory; removed afterwards)."""
    rows, head_dim = weight.get_shape()
    width = packed_row_bytes(head_dim)
    for stale in file.parent.glob(f".{file.name}.packing*"):  # left by a conversion that was killed
        pid = stale.name.rpartition(".packing")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            stale.unlink(missing_ok=True)
    scratch = file.with_name(f".{file.name}.packing{os.getpid()}")
    try:
        packed = torch.from_file(str(scratch), shared=True, size=rows * width, dtype=torch.uint8)
        write_table(file, _pack_table(weight, scale, packed.view(rows, width)),
                    metadata={"layer_id": str(layer_id), _SOURCE_KEY: source})
    finally:
        scratch.unlink(missing_ok=True)


def _layer_store(reader: _Reader, layer_id: int, rows: int, head_dim: int, placement: str, table_dir: Path,
                 cache_rows: int, store_options: Mapping[str, Any]) -> TableStore:
    """A ``placement`` store of the layer's table, from its converted file in ``table_dir``: reused when complete
    and of this checkpoint's tensors (:func:`_table_source`), else (also when a chunk fails its checksum) written
    again."""
    weight, scale = _table_slices(reader, layer_id, rows, head_dim)
    file = table_dir / converted_table_name(layer_id)
    source = _table_source(reader.files, layer_id)
    if _is_converted(file, rows, packed_row_bytes(head_dim), source):
        try:
            return open_table_store(file, placement, cache_rows, **store_options)
        except TableFileError:
            pass  # corrupt data under a valid header: convert again
    _convert_table(weight, scale, file, layer_id, source)
    return open_table_store(file, placement, cache_rows, **store_options)


def _layer_state(reader: _Reader, layer_id: int, cfg: EngramConfig, hidden: int, branches: int,
                 device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """The ``state_dict`` of one :class:`Engram` but its table, from the checkpoint's tensors of ``layer_id``."""
    out_dim, in_dim = (branches + 1) * hidden, cfg.memory_dim
    grid = (-(-out_dim // FP8_SCALE_BLOCK), -(-in_dim // FP8_SCALE_BLOCK))
    wkv = reader.checked(engram_tensor(layer_id, "wkv.weight"), (out_dim, in_dim),
                         f"[(hc_mult + 1) * hidden_size, heads * head_dim] = [({branches} + 1) * {hidden}, "
                         f"{cfg.num_heads} * {cfg.head_dim}]")
    wkv_scale = reader.checked(engram_tensor(layer_id, "wkv.scale"), grid,
                               f"one scale per {FP8_SCALE_BLOCK}x{FP8_SCALE_BLOCK} block of wkv.weight")
    norms = {suffix: reader.checked(engram_tensor(layer_id, suffix), (branches, hidden), "[hc_mult, hidden_size]")
             for suffix in ("q_weight", "k_weight")}
    return {
        "value_key_proj.weight": dequantize_blocks(wkv[:], wkv_scale[:], dtype=dtype).to(device),
        "query_norm.weight": norms["q_weight"][:].float().to(device),
        "key_norm.weight": norms["k_weight"][:].float().to(device),
    }


def load_deepseek_v41_engram(path: str | os.PathLike[str], layers: Iterable[int] | None = None, *,
                             device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                             tokenizer: str | CompressedTokenizer = TOKENIZER, dead_token_ids: Iterable[int] = (),
                             hidden_size: int | None = None, hc_mult: int | None = None,
                             table_placement: str = "device", table_dir: str | os.PathLike[str] | None = None,
                             cache_rows: int = 0, **store_options: Any) -> DeepSeekV41Engram:
    """Load the Engram layers of a DeepSeek-V4.1-format checkpoint folder (see the module docstring).

    Args:
        path: the folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
        layers: Engram layers to load (default: every ``engram_layer_ids``); the hasher always has them all.
        device: where the weights go and lookups and layers compute; the tables too with placement ``"device"``
            (a V4.1 table is ~101 GB: host memory, or a GPU that holds it).
        dtype: of the dequantised ``wkv`` and so of the projection; bf16 holds it exactly, ``torch.float32``
            projects in fp32.
        tokenizer: a registered name or path (default ``"deepseek-v4"``, fetched on first use), or a built
            :class:`CompressedTokenizer` of the checkpoint's ids.
        dead_token_ids: ids always treated as dead besides the config's image token (``image_token_id``, else
            129264) and any ``dead_mask``.
        hidden_size, hc_mult: the backbone width and mHC branches, when ``config.json`` lacks those keys.
        table_placement: where each table's packed FP8 rows are served from: ``"device"`` (a parameter on
            ``device``), ``"host"`` (a private or ``/dev/shm`` copy in host memory) or ``"disk"`` (a memory-mapped
            file). ``host`` and ``disk`` read a table file converted once per layer into ``table_dir``
            (:func:`converted_table_name`), streamed from the checkpoint in chunks and written atomically; a later
            load reuses it when it is complete, of the same rows and width, and records the same source (name, size
            and mtime of the checkpoint files holding ``embed.weight`` and ``embed.scale``); any other file there
            (truncated, corrupt, of another checkpoint) is converted again. Rows read are the same bits in every
            placement.
        table_dir: the folder of the converted tables (created if missing); required by ``host`` and ``disk``.
        cache_rows: > 0 puts a cache of that many hot rows on the compute device in front of a ``host`` or
            ``disk`` table.
        store_options: passed to :func:`engram.storage.open_table_store` (``host_method``, ``workers``,
            ``share_memory``, ``shm_dir``, ``host_memory_budget``, ``verify``).
    Raises:
        ValueError: naming the file or tensor: no config or weights, a config the hashing refuses, an Engram tensor
            missing, unexpected, of another dtype or shape (a table whose rows are not the prime sums), or a layer
            that is not an Engram layer; a placement other than the three, ``host`` or ``disk`` without
            ``table_dir``, or ``table_dir``, ``cache_rows`` or store options with ``device``.

    Example:
        >>> engram = load_deepseek_v41_engram("DeepSeek-V4.1-Flash", layers=[14],  # doctest: +SKIP
        ...                                   table_placement="disk", table_dir="/nvme/v41-tables")
        >>> ids = torch.tensor([[0, 100, 2000]])
        >>> reads = engram.lookup(ids)                            # doctest: +SKIP
        >>> h = torch.randn(1, 3, 4, 5120, dtype=torch.bfloat16)  # the backbone's streams entering block 14
        >>> engram(h, ids, layer_id=14).shape                     # doctest: +SKIP
        torch.Size([1, 3, 4, 5120])
    """
    if table_placement not in PLACEMENTS:
        raise ValueError(f"table_placement must be one of {PLACEMENTS}, got {table_placement!r}")
    if table_placement == "device":
        extra = [*(["table_dir"] if table_dir is not None else []), *(["cache_rows"] if cache_rows else []),
                 *sorted(store_options)]
        if extra:
            raise ValueError(f"{', '.join(extra)} go with table_placement 'host' or 'disk', not 'device' (the "
                             "table is a parameter on the device)")
    elif table_dir is None:
        raise ValueError(f"table_placement {table_placement!r} serves a table file converted from the checkpoint: "
                         "pass table_dir=, a folder to write it to (~101 GB a layer for V4.1) or that holds it")
    config = read_config(path)
    cfg = EngramConfig.from_hf_config(config, tokenizer=tokenizer if isinstance(tokenizer, str) else TOKENIZER)
    cfg = replace(cfg, dead_token_ids=[*cfg.dead_token_ids, *dead_token_ids])
    text = config.get("text_config", config)  # a JSON object: from_hf_config checked it
    hidden, branches = backbone_dims(text, hidden_size, hc_mult)
    chosen = list(cfg.layer_ids if layers is None else layers)
    for layer_id in chosen:
        if layer_id not in cfg.layer_ids:
            raise ValueError(f"layer {layer_id} is not an Engram layer of {str(path)!r} (engram_layer_ids: "
                             f"{cfg.layer_ids})")
    files = checkpoint_files(path)
    check_engram_tensors(files, cfg, chosen)
    hasher = NgramHasher(cfg, tokenizer=tokenizer if isinstance(tokenizer, CompressedTokenizer) else None)
    device = torch.device(device)
    if table_dir is not None:
        table_dir = Path(table_dir)
        table_dir.mkdir(parents=True, exist_ok=True)
    engrams = {}
    with _Reader(files) as reader:
        for layer_id in cfg.layer_ids:
            if layer_id not in chosen:
                continue
            rows = sum(hasher.flat_table_sizes(layer_id))
            engram = Engram(cfg, layer_id, hidden, branches, hasher=hasher, table_device="meta")
            state = _layer_state(reader, layer_id, cfg, hidden, branches, device, dtype)
            table = engram.multi_head_embedding
            if table_placement == "device":
                packed = torch.empty(rows, table.row_width, dtype=torch.uint8, device=device)
                state["multi_head_embedding.weight"] = _pack_table(*_table_slices(reader, layer_id, rows,
                                                                                  cfg.head_dim), packed)
            else:
                table.use_store(_layer_store(reader, layer_id, rows, cfg.head_dim, table_placement, table_dir,
                                             cache_rows, store_options))
            engram.load_state_dict(state, assign=True)
            engrams[layer_id] = engram.to(device).eval()
    return DeepSeekV41Engram(cfg, hasher, engrams)
