"""Engram tables published in Mooncake Store: the objects, the manifest that says what they hold, publishing them
and opening them for a model (placement ``store``).

The objects follow Mooncake's own ``EngramStore`` layout: one object per Engram layer and hash head,
``{prefix}:l{L}:h{H}``, the head's rows back to back (row ``r`` at byte ``r * row_bytes``). With the default
prefix ``engram`` and fp32 rows, ``mooncake.store.EngramStore`` (what the vLLM / SGLang readers use) reads the very
objects published here; bf16 and packed FP8 rows keep their own widths (``EngramStore`` reads fp32 only).

``{prefix}:manifest`` (JSON, written last, so a publish that stopped midway has none) holds the hashing
fingerprint, the row format, each layer's head sizes and the identity of the table file each layer came from
(shape, dtype and its CRC-32s). A model refuses tables whose fingerprint, shape or row format differ from its own,
and, when its folder has the table file, tables made from other weights.
Objects are hard-pinned: the store never evicts them to make room.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from engram.storage.cache import CachedStore
from engram.storage.mooncake import SharedClient, StoreConfig, load_mooncake
from engram.storage.remote import MooncakeStore, describe_code
from engram.storage.store import TableStore
from engram.storage.table_file import TableHeader

MANIFEST_FORMAT = 1
DEFAULT_PREFIX = "engram"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def head_keys(prefix: str, layer_id: int, num_heads: int) -> list[str]:
    """The objects of an Engram layer's heads: ``["engram:l1:h0", ...]`` for prefix ``engram``."""
    return [f"{prefix}:l{layer_id}:h{head}" for head in range(num_heads)]


def manifest_key(prefix: str) -> str:
    return f"{prefix}:manifest"


def source_identity(header: TableHeader) -> dict[str, Any]:
    """What identifies a table file's content: shape, dtype and the CRC-32 of every chunk."""
    return {"num_rows": header.num_rows, "dim": header.dim, "dtype": str(header.dtype).removeprefix("torch."),
            "chunk_bytes": header.chunk_bytes, "crc32": list(header.crc32)}


@dataclass(frozen=True)
class Manifest:
    """What a prefix of the store holds: every layer's head sizes and source, in one row format and dtype."""

    fingerprint: dict[str, Any]  # the Engram hashing fingerprint (engram.hashing.NgramHasher.fingerprint)
    row_format: str  # "float" | "fp8"
    dtype: str  # the rows' dtype: float32, bfloat16, float16, or uint8 (packed FP8 rows)
    row_width: int  # elements per row (bytes for packed FP8 rows)
    table_sizes: dict[str, list[int]]  # rows per head, per layer id
    sources: dict[str, dict[str, Any] | None]  # source_identity of each layer's table file
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            manifest = cls(**json.loads(data))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where} is not an engram table manifest ({type(err).__name__}: {err})") from None
        if manifest.format != MANIFEST_FORMAT or manifest.dtype not in _DTYPES:
            raise ValueError(f"{where}: manifest format {manifest.format} / dtype {manifest.dtype!r}; this reader "
                             f"knows format {MANIFEST_FORMAT} and dtypes {sorted(_DTYPES)}")
        return manifest

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def _exists(client: Any, keys: list[str], master: str) -> list[bool]:
    answers = client.batch_is_exist(keys)
    failed = [(key, code) for key, code in zip(keys, answers) if code < 0]
    if failed or len(answers) != len(keys):
        raise ConnectionError(f"could not ask the Mooncake Store of master {master} whether {failed or keys} exist")
    return [code == 1 for code in answers]


def read_manifest(client: Any, prefix: str, master: str) -> Manifest | None:
    """The manifest published under ``prefix``, or ``None`` when there is none."""
    key = manifest_key(prefix)
    if not _exists(client, [key], master)[0]:
        return None
    return Manifest.from_json(client.get(key), f"{key!r} in the store of master {master}")


@dataclass(frozen=True)
class LayerTable:
    """One layer's table to publish: ``[R, D]`` rows (a contiguous CPU tensor, e.g. a memory-mapped table file),
    rows per head, and the header of the table file it came from (``None``: a table from memory, which models that
    have a table file of their own refuse)."""

    table: Tensor
    table_sizes: list[int]
    source: TableHeader | None = None


def publish_tables(config: StoreConfig, tables: dict[int, LayerTable], fingerprint: dict[str, Any],
                   row_format: str, prefix: str = DEFAULT_PREFIX, replicas: int = 1, replace: bool = False) -> bool:
    """Put every layer's table into the store of ``config.master`` under ``prefix``, then its manifest.

    Returns ``False`` (and puts nothing) when the same tables are published there already. Tables of another
    manifest under ``prefix`` are refused unless ``replace``: then the old manifest goes first (no model opens
    the prefix meanwhile), then the old objects, then the new ones are put. Do not replace tables that servers
    are reading: publish under a new prefix instead. Objects without a manifest (a publish that stopped midway)
    are removed first. ``replicas`` copies of each object go to different holders (a holder that dies then loses
    no table).
    """
    if not tables:
        raise ValueError("no Engram tables to publish")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    first = next(iter(tables.values())).table
    for layer_id, layer in tables.items():
        if layer.table.dtype != first.dtype or layer.table.shape[1] != first.shape[1]:
            raise ValueError(f"layer {layer_id}'s table is [.., {layer.table.shape[1]}] {layer.table.dtype}, layer "
                             f"{next(iter(tables))}'s [.., {first.shape[1]}] {first.dtype}: publish one row format")
        if sum(layer.table_sizes) != layer.table.shape[0] or not layer.table.is_contiguous():
            raise ValueError(f"layer {layer_id}'s table has {layer.table.shape[0]} rows (contiguous: "
                             f"{layer.table.is_contiguous()}); its heads need {sum(layer.table_sizes)}, contiguous")
    manifest = Manifest(fingerprint, row_format, str(first.dtype).removeprefix("torch."), first.shape[1],
                        {str(layer): list(t.table_sizes) for layer, t in tables.items()},
                        {str(layer): None if t.source is None else source_identity(t.source)
                         for layer, t in tables.items()})
    keys = {layer: head_keys(prefix, layer, len(t.table_sizes)) for layer, t in tables.items()}
    shared = SharedClient(config)
    try:
        client = shared.client
        existing = read_manifest(client, prefix, config.master)
        if existing == manifest and all(_exists(client, [k for ks in keys.values() for k in ks], config.master)):
            return False
        if existing is not None and not replace:
            raise ValueError(f"the store of master {config.master} holds other Engram tables under prefix {prefix!r} "
                             "(another checkpoint, hashing or row format): publish under another --prefix, or pass "
                             "--replace once no server reads them")
        stale = [manifest_key(prefix)] + [k for ks in keys.values() for k in ks]
        if existing is not None:
            stale += [key for layer, sizes in existing.table_sizes.items()
                      for key in head_keys(prefix, int(layer), len(sizes))]
        stale = list(dict.fromkeys(stale))
        present = [key for key, found in zip(stale, _exists(client, stale, config.master)) if found]
        for key, code in zip(present, client.batch_remove(present, force=True) if present else []):
            if code not in (0, -704):  # -704: gone already
                raise ConnectionError(f"could not remove {key!r} from the store of master {config.master}: "
                                      f"{describe_code(code)}")
        store = _replicated(replicas)
        for layer, layer_table in tables.items():
            _put_layer(client, keys[layer], layer_table, store, config.master)
        data = torch.frombuffer(bytearray(manifest.to_json()), dtype=torch.uint8)
        _put_checked(client, [manifest_key(prefix)], data, [0], [data.numel()], store, config.master)
    finally:
        shared.release()
    return True


def _replicated(replicas: int) -> Any:
    config = load_mooncake().ReplicateConfig()
    config.replica_num = replicas
    config.with_hard_pin = True  # never evicted to make room for other objects
    return config


def _put_layer(client: Any, keys: list[str], layer: LayerTable, replicate: Any, master: str) -> None:
    row_bytes = layer.table.shape[1] * layer.table.element_size()
    starts = [0, *torch.tensor(layer.table_sizes).cumsum(0).tolist()]
    _put_checked(client, keys, layer.table, [start * row_bytes for start in starts[:-1]],
                 [size * row_bytes for size in layer.table_sizes], replicate, master)


def _put_checked(client: Any, keys: list[str], buffer: Tensor, offsets: list[int], sizes: list[int],
                 replicate: Any, master: str) -> None:
    """Put ``sizes[i]`` bytes at ``offsets[i]`` of ``buffer`` as ``keys[i]``; ``ConnectionError`` naming the first
    key that failed."""
    pointer, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    code = client.register_buffer(pointer, nbytes)
    if code != 0:
        raise ConnectionError(f"could not register {nbytes} bytes with the store of master {master}: "
                              f"{describe_code(code)}")
    try:
        results = client.batch_put_from(keys, [pointer + offset for offset in offsets], sizes, replicate)
    finally:
        client.unregister_buffer(pointer)
    for key, size, code in zip(keys, sizes, results):
        if code != 0:
            raise ConnectionError(f"putting {key!r} ({size} bytes) into the store of master {master} failed: "
                                  f"{describe_code(code)} (do the holders lend enough memory?)")


class PublishedTables:
    """The tables published under ``prefix`` in the store of ``master``, opened for a model: one client shared by
    every layer's store (:meth:`open_layer`), closed when the last of them and this object are closed.

    Raises ``ValueError`` when nothing is published there; ``ConnectionError`` when the store cannot be reached.
    """

    def __init__(self, store_master: str | StoreConfig, store_prefix: str = DEFAULT_PREFIX):
        config = store_master if isinstance(store_master, StoreConfig) else StoreConfig(store_master)
        self.prefix = store_prefix
        self.shared = SharedClient(config)
        try:
            manifest = read_manifest(self.shared.client, store_prefix, config.master)
        except BaseException:
            self.shared.release()
            raise
        if manifest is None:
            self.shared.release()
            raise ValueError(f"no Engram tables are published under prefix {store_prefix!r} in the store of master "
                             f"{config.master}: run engram store publish --checkpoint DIR --master {config.master}")
        self.manifest = manifest

    @property
    def where(self) -> str:
        return f"the tables published under {self.prefix!r} in the store of master {self.shared.config.master}"

    def check_fingerprint(self, fingerprint: dict[str, Any] | None) -> None:
        """``ValueError`` naming every hashing field in which ``fingerprint`` (the model's) differs."""
        published = self.manifest.fingerprint
        differences = [f"{key}: store {published.get(key)!r}, model {(fingerprint or {}).get(key)!r}"
                       for key in sorted(set(published) | set(fingerprint or {}))
                       if published.get(key) != (fingerprint or {}).get(key)]
        if differences:
            raise ValueError(f"refusing {self.where}: their Engram hashing differs from the model's (rows would be "
                             "read at the wrong places): " + "; ".join(differences))

    def open_layer(self, layer_id: int, row_format: str, source: TableHeader | None = None,
                   cache_rows: int = 0) -> TableStore:
        """A store serving layer ``layer_id``'s rows (behind a :class:`CachedStore` of ``cache_rows`` rows if > 0).

        ``row_format`` is what the model reads (``float`` / ``fp8``); ``source``, the header of the model's own
        table file where its folder has one: tables published from other weights are then refused. The model
        checks the shape and dtype (``use_store``). Every head's object must be in the store.
        """
        manifest, where = self.manifest, self.where
        sizes = manifest.table_sizes.get(str(layer_id))
        if sizes is None:
            raise ValueError(f"{where} have no Engram layer {layer_id} (they have layers "
                             f"{sorted(manifest.table_sizes)})")
        if manifest.row_format != row_format:
            raise ValueError(f"{where} hold {manifest.row_format} rows and the model reads {row_format} rows: load it "
                             f"with engram_table_format={manifest.row_format!r}, or publish with --table-format "
                             f"{row_format}")
        if source is not None and manifest.sources[str(layer_id)] != source_identity(source):
            raise ValueError(f"{where} were made from other weights than {source.path} (its shape or CRC-32s differ): "
                             "publish this checkpoint (under another --prefix), or load the checkpoint they came from")
        keys = head_keys(self.prefix, layer_id, len(sizes))
        missing = [key for key, found in zip(keys, _exists(self.shared.client, keys, self.shared.config.master))
                   if not found]
        if missing:
            raise ValueError(f"{where} lost objects {missing}: the holder process that kept them stopped, or they were "
                             "removed; publish the tables again")
        store: TableStore = MooncakeStore(self.shared.acquire(), keys, sizes, manifest.row_width, manifest.torch_dtype)
        return CachedStore(store, cache_rows) if cache_rows else store

    def close(self) -> None:
        """Let go of this object's use of the client (the layers' stores keep theirs)."""
        self.shared.release()
