"""`engram serve`: run the multi-tenant server, or add a tenant to a tenants file (`engram serve add-tenant`)."""

from __future__ import annotations

import argparse
import logging


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
                        help="how long a batch waits for more requests after its first")
    parser.add_argument("--max-tokens-limit", type=int, default=512,
                        help="largest max_tokens a request may ask for (also capped by the model's context)")
    parser.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond which new ones get 429")
    parser.add_argument("--max-prompt-chars", type=int, default=None,
                        help="longest prompt in characters, refused before it is tokenised (default: 32 per token "
                             "of the model's context)")
    parser.add_argument("--model-name", default=None, help="model id shown to clients (default: the checkpoint "
                                                           "folder's name)")
    actions = parser.add_subparsers(dest="serve_command")
    add = actions.add_parser("add-tenant", help="add a tenant with a new key (printed once; the file keeps its hash)",
                             description="Add a tenant to the tenants file, creating the file and an admin key "
                                         "when it does not exist. Keys are printed once: only hashes are stored.")
    add.add_argument("--tenants", required=True, help="the tenants file")
    add.add_argument("--name", required=True, help="tenant name (A-Z a-z 0-9 _ -, at most 64)")
    add.add_argument("--patch", default=None, help="a memory patch file this tenant reads (optional)")
    return parser


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
    from engram.serve.engine import Engine
    from engram.serve.tenants import TenantRegistry, read_tenants

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tenants_file = read_tenants(args.tenants)  # a bad file is refused before the model loads
    engine = Engine.from_checkpoint(args.checkpoint, device=args.device, model_name=args.model_name,
                                    max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                                    max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue,
                                    max_prompt_chars=args.max_prompt_chars)
    registry = TenantRegistry(tenants_file, engine.load_overlay)  # loads and checks every tenant's patch
    with engine:
        uvicorn.run(create_app(engine, registry), host=args.host, port=args.port)
    return 0
