"""Save and load EngramLM: ``config.json`` + ``model.safetensors`` (sharded above 5 GB, with an index) +
one table file per Engram layer (``engram-layer-{L}.safetensors``, :mod:`engram.storage.table_file`: a
safetensors file with per-chunk checksums that loads into any placement — device, host, disk — as is).
Folders written before table files existed (tables inside ``model.safetensors``) still load.

Tables keep the row format they have in memory: float, or packed FP8 (``engram.kernels.fp8``, uint8 table files that
say so); ``config.json`` names it under ``engram_table_format`` (absent: float), and ``from_pretrained`` can
quantise a float folder's tables to FP8 while loading them.

Every weights file carries the Engram hashing fingerprint (seed, layer ids, table sizes, multipliers,
tokenizer sha256, compression rules version) in its safetensors metadata. Loading recomputes the
fingerprint from the config and the installed tokenizer and refuses any difference: tables read through
other hashing give wrong answers, not a crash.

Every file is checksummed (:mod:`engram.storage.checksums`): each safetensors file carries a CRC-32 per 64 MiB
chunk of its data, and ``checksums.json`` covers ``config.json``, the shard index and the tokenizer. Loading
checks them and refuses a corrupt file, naming it and the byte range. Folders saved before checksums existed
load unchecked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn

from engram.atomic import atomic_path, atomic_write_text
from engram.embedding import MultiHeadEmbedding, quantize_tables
from engram.hashing import complete_fingerprint
from engram.kernels.fp8 import ROW_FORMATS, quantize_table
from engram.model.config import EngramLMConfig
from engram.storage import load_table, map_table, open_table_store, write_table
from engram.storage.checksums import record_checksums, verify_recorded, verify_safetensors, write_safetensors
from engram.storage.placement import MODEL_PLACEMENTS
from engram.storage.published import PublishedTables
from engram.storage.table_file import TableHeader, read_header
from engram.tokenizer import NAMED_TOKENIZERS, resolve_tokenizer_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1
MODEL_TYPE = "engram"  # config.json's "model_type": transformers' AutoConfig finds engram.hf's config by it
MAX_SHARD_BYTES = 5 * 1024**3
_FINGERPRINT_KEY = "engram_fingerprint"
_TABLES_KEY = "engram_tables"
_TABLE_FORMAT_KEY = "engram_table_format"
# An EngramLM, named by its base class: engram.model.lm builds on this module, not the other way round.
Model = TypeVar("Model", bound=nn.Module)


def table_file_name(layer_id: int, rows: tuple[int, int] | None = None) -> str:
    """The file of an Engram layer's table, or of its rows ``[start, end)`` (one rank's part)."""
    return f"engram-layer-{layer_id}.safetensors" if rows is None else \
        f"engram-layer-{layer_id}.rows-{rows[0]}-{rows[1]}.safetensors"


def _weights_metadata(model: nn.Module) -> dict[str, str]:
    """The safetensors metadata of every weights file of ``model``: format version and hashing fingerprint."""
    fingerprint = model.hasher.fingerprint() if model.hasher is not None else None
    return {"format_version": str(FORMAT_VERSION), _FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True)}


def table_metadata(model: nn.Module, layer_id: int) -> dict[str, str]:
    """The safetensors metadata of a table file of ``model``'s Engram layer ``layer_id``."""
    return {**_weights_metadata(model), "layer_id": str(layer_id)}


def table_format(model: nn.Module) -> str:
    """The row format of ``model``'s Engram tables, ``"float"`` or ``"fp8"`` (``"float"`` without Engram)."""
    formats = {block.engram.multi_head_embedding.row_format for block in model.blocks if block.engram is not None}
    if len(formats) > 1:
        raise ValueError(f"the model's Engram tables mix row formats {sorted(formats)}; save them in one format")
    return formats.pop() if formats else "float"


def _table_key(block_index: int) -> str:
    return f"blocks.{block_index}.engram.multi_head_embedding.weight"


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _pack_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], max_shard_bytes: int = MAX_SHARD_BYTES,
                    table_parts: Mapping[int, list[list[Any]]] | None = None) -> Path:
    """Write ``model`` (an :class:`~engram.model.EngramLM`) into ``directory`` (created if needed); files are replaced
    atomically.

    ``table_parts``: Engram layers whose table is already written as row parts (``[file, start, end]``, one per
    rank of a distributed run, see :mod:`engram.parallel.checkpoint`), listed in ``config.json`` instead.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = _weights_metadata(model)
    tables: dict[int, str | list[list[Any]]] = {}
    for block in model.blocks:
        if block.engram is not None and table_parts is not None and block.layer_idx in table_parts:
            tables[block.layer_idx] = [list(part) for part in table_parts[block.layer_idx]]
        elif block.engram is not None:
            tables[block.layer_idx] = table_file_name(block.layer_idx)
            write_table(directory / tables[block.layer_idx], block.engram.multi_head_embedding.table().cpu(),
                        metadata=table_metadata(model, block.layer_idx))
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
             if name not in {_table_key(layer) for layer in tables}}
    shards = _pack_shards(state, max_shard_bytes)
    names = _shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard, metadata=metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
        atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True))
    model_config = model.cfg.to_dict()
    shipped = model.cfg.tokenizer not in NAMED_TOKENIZERS
    if shipped:  # ship the tokenizer: the folder is self-contained
        source = resolve_tokenizer_path(model.cfg.tokenizer)
        if source.resolve() != (directory / TOKENIZER_NAME).resolve():
            with atomic_path(directory / TOKENIZER_NAME) as tmp:
                shutil.copyfile(source, tmp)
        model_config["tokenizer"] = TOKENIZER_NAME
        if model_config["engram"] is not None:
            model_config["engram"]["tokenizer"] = TOKENIZER_NAME
    config = {"format_version": FORMAT_VERSION, "model_type": MODEL_TYPE, "model": model_config,
              _FINGERPRINT_KEY: json.loads(metadata[_FINGERPRINT_KEY]),
              _TABLES_KEY: {str(layer): name for layer, name in tables.items()}, _TABLE_FORMAT_KEY: table_format(model)}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    table_names = {part[0] for entry in tables.values() for part in (entry if isinstance(entry, list) else [[entry]])}
    keep = set(names) | table_names | ({INDEX_NAME} if len(shards) > 1 else set())
    for pattern in ("model*.safetensors*", "engram-layer-*.safetensors"):  # an earlier save's other files
        for stale in directory.glob(pattern):
            if stale.name not in keep:
                stale.unlink()
    record_checksums(directory, [CONFIG_NAME] + ([INDEX_NAME] if len(shards) > 1 else [])
                     + ([TOKENIZER_NAME] if shipped else []))
    return directory


def table_fingerprint(header: TableHeader) -> Any:
    """The Engram hashing fingerprint a table file was saved with (``None`` if it has none)."""
    return json.loads(header.metadata.get(_FINGERPRINT_KEY, "null"))


def table_files(directory: str | os.PathLike[str]) -> dict[int, Path]:
    """The table file of every Engram layer of a ``save_pretrained`` folder (its ``config.json`` checked against
    ``checksums.json``); ``ValueError`` for a folder whose tables are row parts or inside the model weights."""
    directory = Path(directory)
    verify_recorded(directory, [CONFIG_NAME])
    entries = json.loads((directory / CONFIG_NAME).read_text()).get(_TABLES_KEY, {})
    if not entries or not all(isinstance(entry, str) for entry in entries.values()):
        raise ValueError(f"{directory} has no table file per Engram layer (config.json lists {entries or 'none'}): "
                         "load it with the default placement and save_pretrained it again")
    return {int(layer): directory / entry for layer, entry in entries.items()}


def _fingerprint_differences(saved: Any, current: Any) -> list[str]:
    if saved is None or current is None:
        if saved == current:
            return []
        return [f"Engram: weights {'have' if saved else 'have no'} Engram tables, config "
                f"{'has' if current else 'has no'} Engram"]
    saved = complete_fingerprint(saved)  # weights saved before a field existed had its default
    keys = sorted(set(saved) | set(current))
    return [f"{key}: weights {saved.get(key)!r}, now {current.get(key)!r}" for key in keys
            if saved.get(key) != current.get(key)]


def load_state(directory: Path) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """All tensors of a saved model and the fingerprint found in each weights file."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")
    state: dict[str, torch.Tensor] = {}
    fingerprints = []
    for name in files:
        verify_safetensors(directory / name)
        with safe_open(str(directory / name), framework="pt") as handle:
            fingerprints.append(json.loads((handle.metadata() or {}).get(_FINGERPRINT_KEY, "null")))
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state, fingerprints


def _refuse_mismatch(directory: Path, fingerprints: list[Any], current: Any) -> None:
    for saved in fingerprints:
        differences = _fingerprint_differences(saved, current)
        if differences:
            raise ValueError(f"refusing to load {directory}: the Engram hashing of the weights differs from the "
                             "config and tokenizer here (tables would be read at the wrong rows): "
                             + "; ".join(differences))


def _load_table_parts(directory: Path, parts: list[list[Any]], fingerprint: Any, verify: bool) -> torch.Tensor:
    """The ``[R, D]`` table assembled from its row parts ``[file, start, end]``, which must tile ``[0, R)``."""
    headers = [read_header(directory / file) for file, _, _ in parts]
    for header in headers:
        _refuse_mismatch(directory, [table_fingerprint(header)], fingerprint)
    expected = 0
    for (file, start, end), header in zip(parts, headers):
        if start != expected or header.num_rows != end - start or header.dim != headers[0].dim:
            raise ValueError(f"{directory}: table part {file} holds rows [{start}, {end}) of shape "
                             f"[{header.num_rows}, {header.dim}], which does not continue the parts before it")
        expected = end
    table = torch.empty(expected, headers[0].dim, dtype=headers[0].dtype)
    for (file, start, end), header in zip(parts, headers):
        load_table(header.path, out=table[start:end], verify=verify)
    return table


def _in_format(table: torch.Tensor, embedding: MultiHeadEmbedding) -> torch.Tensor:
    """A table already in memory, quantised to packed FP8 rows (chunk by chunk) if ``embedding`` reads those."""
    if embedding.row_format == "fp8" and table.dtype.is_floating_point:
        return quantize_table(table)
    return table


def _load_device_table(header: TableHeader, embedding: MultiHeadEmbedding, verify: bool) -> torch.Tensor:
    """The table file of ``header`` in memory, in ``embedding``'s row format."""
    if embedding.row_format == "fp8" and header.row_format == "float":
        with map_table(header.path, verify=verify) as mapped:  # quantised from the page cache: no float copy
            return quantize_table(mapped.tensor)
    return load_table(header.path, verify=verify)


def _use_published_tables(model: nn.Module, directory: Path, table_files: dict[str, Any], fingerprint: Any,
                          cache_rows: int, options: dict[str, Any]) -> None:
    """Read every Engram table of ``model`` from Mooncake Store (placement ``store``, ``options``: those of
    :class:`~engram.storage.published.PublishedTables`). A table file the folder has only says which weights the
    store must hold; none is needed."""
    published = PublishedTables(**options)
    opened = []
    try:
        published.check_fingerprint(fingerprint)
        for block in model.blocks:
            if block.engram is None:
                continue
            entry = table_files.get(str(block.layer_idx))
            own_file = isinstance(entry, str) and (directory / entry).is_file()
            source = read_header(directory / entry) if own_file else None
            embedding = block.engram.multi_head_embedding
            opened.append(published.open_layer(block.layer_idx, embedding.row_format, source, cache_rows))
            embedding.use_store(opened[-1])
    except BaseException:
        for store in opened:
            store.close()
        raise
    finally:
        published.close()


def load_pretrained(cls: type[Model], directory: str | os.PathLike[str], engram_placement: str = "device",
                    engram_cache_rows: int = 0, engram_table_format: str | None = None,
                    **placement_options: Any) -> Model:
    """Build the model of ``config.json`` and load its weights, refusing a hashing mismatch.

    Engram tables go where ``engram_placement`` says, in ``engram_table_format`` (see
    :meth:`EngramLM.from_pretrained`); ``"store"`` reads them from Mooncake Store, ``placement_options`` then being
    those of :class:`~engram.storage.published.PublishedTables` (``store_master``, ``store_prefix``).
    """
    if engram_placement not in MODEL_PLACEMENTS:
        raise ValueError(f"engram_placement must be one of {MODEL_PLACEMENTS}, got {engram_placement!r}")
    if engram_cache_rows and engram_placement == "device":
        raise ValueError(f"engram_cache_rows={engram_cache_rows} needs engram_placement 'host' or 'disk' (or "
                         "'store'): a device table is all in device memory already")
    if engram_table_format is not None and engram_table_format not in ROW_FORMATS:
        raise ValueError(f"engram_table_format must be one of {ROW_FORMATS} (or None: as saved), got "
                         f"{engram_table_format!r}")
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    verify_recorded(directory, [CONFIG_NAME, INDEX_NAME, TOKENIZER_NAME])
    data = json.loads(config_path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {data.get('format_version')!r} is not {FORMAT_VERSION}")
    saved_format = data.get(_TABLE_FORMAT_KEY, "float")
    if saved_format == "fp8" and engram_table_format == "float":
        raise ValueError(f"{directory} holds FP8 Engram tables; they load as they are (engram_table_format 'fp8' or "
                         "None), not converted to float")
    if saved_format == "float" and engram_table_format == "fp8" and engram_placement == "disk":
        raise ValueError(f"{directory} holds float Engram tables and placement 'disk' maps the files as they are: "
                         "quantise them while loading with placement 'device' or 'host', save_pretrained that "
                         "model, and map its FP8 folder")
    model_config = data["model"]
    if model_config.get("tokenizer") == TOKENIZER_NAME:  # shipped inside the folder
        model_config["tokenizer"] = str(directory / TOKENIZER_NAME)
        if model_config.get("engram") is not None:
            model_config["engram"]["tokenizer"] = model_config["tokenizer"]
    model = cls(EngramLMConfig.from_dict(model_config), table_device="meta")
    if (engram_table_format or saved_format) == "fp8":
        quantize_tables(model)  # meta tables: only their row format changes
    state, fingerprints = load_state(directory)
    current = model.hasher.fingerprint() if model.hasher is not None else None
    _refuse_mismatch(directory, fingerprints + [data.get(_FINGERPRINT_KEY)], current)
    table_files = data.get(_TABLES_KEY, {})
    verify = placement_options.get("verify", True)
    if engram_placement == "store":
        _use_published_tables(model, directory, table_files, current, engram_cache_rows, placement_options)
    for block in model.blocks:
        if block.engram is None:
            continue
        embedding = block.engram.multi_head_embedding
        inline = state.pop(_table_key(block.layer_idx), None)  # a folder from before table files
        entry = table_files.get(str(block.layer_idx))
        if engram_placement == "store":
            continue
        if isinstance(entry, list):  # row parts, one per rank of a distributed run
            if engram_placement != "device":
                raise ValueError(f"{directory} holds Engram layer {block.layer_idx}'s table in {len(entry)} row "
                                 f"parts (a distributed checkpoint); placement {engram_placement!r} reads one table "
                                 "file: load it with the default placement and save_pretrained it again")
            embedding.use_table(_in_format(_load_table_parts(directory, entry, current, verify), embedding))
        elif entry is not None:
            header = read_header(directory / entry)
            _refuse_mismatch(directory, [table_fingerprint(header)], current)
            if engram_placement == "device":
                embedding.use_table(_load_device_table(header, embedding, verify))
            else:
                embedding.use_store(open_table_store(header.path, engram_placement, engram_cache_rows,
                                                     row_format=embedding.row_format, **placement_options))
        elif inline is None:
            raise ValueError(f"{directory}: no table for Engram layer {block.layer_idx} (config.json lists "
                             f"{sorted(table_files)})")
        elif engram_placement == "device":
            embedding.use_table(_in_format(inline, embedding))
        else:
            raise ValueError(f"{directory} keeps its Engram tables inside the model weights (an older save); "
                             f"placement {engram_placement!r} reads table files: load it with the default "
                             "placement and save_pretrained it again")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("multi_head_embedding.weight")]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit the config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model
