"""`engram serve`: run the multi-tenant server, or add a tenant to a tenants file (`engram serve add-tenant`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engram.storage.placement import MODEL_PLACEMENTS
from engram.storage.published import DEFAULT_PREFIX


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve a model to several tenants over HTTP (OpenAI-style completions)",
        description="Serve one model to the tenants of a tenants file: each tenant's key reads the model through "
                    "its own memory patch. `engram serve add-tenant` makes keys. See docs/serve.md.")
    parser.add_argument("--checkpoint", help="a save_pretrained folder (e.g. RUN/final)")
    parser.add_argument("--tenants", help="the tenants file (TOML; made by `engram serve add-tenant`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="how long an idle engine waits for more requests after the first")
    parser.add_argument("--decode", default="auto", choices=("auto", "graph", "static", "eager"),
                        help="auto: continuous batching, the decode step replayed from CUDA graphs on a GPU (graph) "
                             "or run op by op (static); eager: static batching with the plain decode loop")
    parser.add_argument("--join-every", type=int, default=16,
                        help="continuous batching: while rows run, waiting requests join at most once every this "
                             "many decode steps, prefilled together (1: at every step)")
    parser.add_argument("--max-tokens-limit", type=int, default=512,
                        help="largest max_tokens a request may ask for (also capped by the model's context)")
    parser.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond which new ones get 429")
    parser.add_argument("--max-prompt-chars", type=int, default=None,
                        help="longest prompt in characters, refused before it is tokenised (default: 32 per token "
                             "of the model's context)")
    parser.add_argument("--model-name", default=None, help="model id shown to clients (default: the checkpoint "
                                                           "folder's name)")
    parser.add_argument("--engram-placement", default="device", choices=MODEL_PLACEMENTS,
                        help="where the Engram tables live (README 'Tables anywhere'); store: Mooncake Store, one "
                             "copy shared by every server (docs/store.md)")
    parser.add_argument("--engram-cache-rows", type=int, default=0,
                        help="hot rows cached in the device's memory in front of host, disk or store tables")
    parser.add_argument("--store-master", default=None, help="host:port of the store's master (placement store)")
    parser.add_argument("--store-prefix", default=DEFAULT_PREFIX,
                        help="the prefix the tables were published under (engram store publish --prefix)")
    actions = parser.add_subparsers(dest="serve_command")
    add = actions.add_parser("add-tenant", help="add a tenant with a new key (printed once; the file keeps its hash)",
                             description="Add a tenant to the tenants file, creating the file and an admin key "
                                         "when it does not exist. Keys are printed once: only hashes are stored.")
    add.add_argument("--tenants", required=True, help="the tenants file")
    add.add_argument("--name", required=True, help="tenant name (A-Z a-z 0-9 _ -, at most 64)")
    add.add_argument("--patch", default=None, help="a memory patch file this tenant reads (optional)")
    return parser


def placement_options(args: argparse.Namespace) -> dict:
    """The ``EngramLM.from_pretrained`` keywords of the placement flags."""
    options = dict(engram_placement=args.engram_placement, engram_cache_rows=args.engram_cache_rows)
    if args.engram_placement == "store":
        if not args.store_master:
            raise ValueError("--engram-placement store needs --store-master HOST:PORT (the store's master)")
        options.update(store_master=args.store_master, store_prefix=args.store_prefix)
    elif args.store_master:
        raise ValueError(f"--store-master goes with --engram-placement store, not {args.engram_placement!r}")
    return options


def run(args: argparse.Namespace) -> int:
    if args.serve_command == "add-tenant":
        from engram.serve.tenants import add_tenant

        key, admin_key = add_tenant(args.tenants, args.name, args.patch)
        if admin_key is not None:
            print(f"created {args.tenants}\nadmin key (keep it secret; shown only now): {admin_key}")
        print(f"tenant {args.name!r} key (keep it secret; shown only now): {key}")
        return 0
    if not args.checkpoint or not args.tenants:
        raise ValueError("engram serve needs --checkpoint DIR and --tenants FILE")
    try:
        import uvicorn

        from engram.serve.app import create_app
    except ImportError as err:
        raise ValueError(f"engram serve needs the serve extra (pip install 'engram[serve]'): {err}") from err
    from engram.model import EngramLM
    from engram.parallel.distributed import resolve_device
    from engram.serve.engine import Engine
    from engram.serve.tenants import TenantRegistry, read_tenants
    from engram.tokenizer import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tenants_file = read_tenants(args.tenants)  # a bad file is refused before the model loads
    model = EngramLM.from_pretrained(args.checkpoint, **placement_options(args)).to(resolve_device(args.device))
    engine = Engine(model, load_tokenizer(model.cfg.tokenizer), args.model_name or Path(args.checkpoint).resolve().name,
                    max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                    max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue,
                    max_prompt_chars=args.max_prompt_chars, decode=args.decode, join_every=args.join_every)
    registry = TenantRegistry(tenants_file, engine.load_overlay)  # loads and checks every tenant's patch
    with engine:
        uvicorn.run(create_app(engine, registry), host=args.host, port=args.port)
    return 0
