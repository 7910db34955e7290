"""`engram store master | hold | publish | show`: Engram tables in Mooncake Store, shared by many model processes.

``master`` runs the store's master on loopback (or the address given), ``hold`` lends the store this process's
memory until stopped, ``publish`` puts a checkpoint's tables into it with their fingerprint, ``show`` prints what a
prefix holds. Models then read them with ``engram_placement="store"`` (``engram serve --engram-placement store``).
The deployment, ports and security: docs/store.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import threading
from dataclasses import dataclass, field

from engram.cli.flags import add_config_flags, config_from_args
from engram.hashing import complete_fingerprint
from engram.kernels.fp8 import ROW_FORMATS, quantize_table
from engram.model.serialization import table_files, table_fingerprint
from engram.storage.mooncake import SharedClient, StoreConfig, connect, master_command
from engram.storage.published import DEFAULT_PREFIX, LayerTable, publish_tables, read_manifest
from engram.storage.table_file import map_table, read_header


@dataclass
class PublishConfig:
    """What `engram store publish` puts into the store."""

    checkpoint: str = field(metadata={"help": "a save_pretrained folder (e.g. RUN/final)"})
    prefix: str = field(default=DEFAULT_PREFIX, metadata={
        "help": "the objects' name prefix: several models share a store under different prefixes"})
    table_format: str | None = field(default=None, metadata={
        "choices": ROW_FORMATS, "help": "rows to publish: as the checkpoint holds them (default), or fp8 (float "
                                        "tables quantised while publishing)"})
    replicas: int = field(default=1, metadata={"help": "copies of each table on different holders"})
    replace: bool = field(default=False, metadata={
        "help": "replace other tables published under --prefix (only while no model reads them)"})


def publish_checkpoint(store: StoreConfig, config: PublishConfig) -> bool:
    """Publish the table files of ``config.checkpoint`` (checked against their CRC-32s); ``False`` when the store
    holds them already. ``ValueError`` for table files of different hashing."""
    files = table_files(config.checkpoint)
    headers = {layer: read_header(path) for layer, path in files.items()}
    saved = [table_fingerprint(header) for header in headers.values()]
    if None in saved or len({json.dumps(complete_fingerprint(f), sort_keys=True) for f in saved}) != 1:
        raise ValueError(f"the table files of {config.checkpoint} carry different hashing fingerprints (or none): "
                         "save the model again")
    fingerprint = complete_fingerprint(saved[0])
    formats = {header.row_format for header in headers.values()}
    if len(formats) != 1:
        raise ValueError(f"the table files of {config.checkpoint} mix row formats {sorted(formats)}")
    saved_format = formats.pop()
    if saved_format == "fp8" and config.table_format == "float":
        raise ValueError(f"{config.checkpoint} holds FP8 tables: they are published as they are, not as float")
    quantize = config.table_format == "fp8" and saved_format == "float"
    mapped = {layer: map_table(path) for layer, path in files.items()}
    try:
        tables = {layer: LayerTable(quantize_table(table.tensor) if quantize else table.tensor,
                                    fingerprint["table_sizes"][str(layer)], headers[layer])
                  for layer, table in mapped.items()}
        return publish_tables(store, tables, fingerprint, "fp8" if quantize else saved_format, config.prefix,
                              config.replicas, config.replace)
    finally:
        for table in mapped.values():
            table.close()


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "store", help="Engram tables in Mooncake Store: run its master, lend it memory, publish tables",
        description="Serve Engram tables from Mooncake Store, one copy shared by many model processes (models read "
                    "it with engram_placement='store'). See docs/store.md for the deployment.")
    actions = parser.add_subparsers(dest="store_command", required=True)
    master = actions.add_parser("master", help="run the store's master (in the foreground)",
                                description="Run mooncake_master with its RPC and metrics servers on --host only "
                                            "and no HTTP metadata server (clients use P2P handshakes).")
    master.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; a private interface across machines)")
    master.add_argument("--port", type=int, default=50051, help="RPC port, what --master names")
    master.add_argument("--metrics-port", type=int, default=9003, help="port of its HTTP metrics/admin server")
    hold = actions.add_parser("hold", help="lend the store memory for tables (in the foreground, until stopped)",
                              description="Join the store and lend it --mib MiB of this process's memory, where "
                                          "published tables live; stopping this process loses what it holds.")
    add_config_flags(hold, StoreConfig)
    hold.add_argument("--mib", type=int, required=True, help="MiB of memory to lend (at least 16)")
    publish = actions.add_parser("publish", help="put a checkpoint's Engram tables into the store",
                                 description="Put every Engram table of --checkpoint (checked against its CRC-32s) "
                                             "into the store with the model's hashing fingerprint; models whose "
                                             "fingerprint or weights differ refuse them.")
    add_config_flags(publish, StoreConfig)
    add_config_flags(publish, PublishConfig)
    show = actions.add_parser("show", help="what a prefix of the store holds")
    add_config_flags(show, StoreConfig)
    show.add_argument("--prefix", default=DEFAULT_PREFIX)
    return parser


def _hold(config: StoreConfig) -> None:
    client = connect(config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"holding {config.segment_bytes // 2**20} MiB for the store of master {config.master} (Ctrl-C stops; "
          "the tables held here are lost then)", flush=True)
    stop.wait()
    client.close()


def run(args: argparse.Namespace) -> int:
    if args.store_command == "master":
        return subprocess.call(master_command(args.host, args.port, args.metrics_port))
    if args.store_command == "hold":
        _hold(config_from_args(StoreConfig, args, segment_bytes=args.mib * 2**20))
        return 0
    store = config_from_args(StoreConfig, args)
    if args.store_command == "publish":
        config = config_from_args(PublishConfig, args)
        done = publish_checkpoint(store, config)
        print(f"{'published' if done else 'already published'}: the Engram tables of {config.checkpoint} under "
              f"prefix {config.prefix!r} in the store of master {store.master}")
        return 0
    shared = SharedClient(store)
    try:
        manifest = read_manifest(shared.client, args.prefix, store.master)
    finally:
        shared.release()
    if manifest is None:
        raise ValueError(f"nothing is published under prefix {args.prefix!r} in the store of master {store.master}")
    print(f"prefix {args.prefix!r}: {manifest.row_format} rows ({manifest.dtype}, {manifest.row_width} wide)")
    for layer, sizes in sorted(manifest.table_sizes.items(), key=lambda item: int(item[0])):
        print(f"  layer {layer}: {len(sizes)} heads, {sum(sizes)} rows")
    return 0
