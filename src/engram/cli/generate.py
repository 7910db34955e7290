"""`engram generate`: sample text from a trained model."""

from __future__ import annotations

import argparse

from engram.serve.generate import generate_text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="sample text from a trained model")
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its final/), a save_pretrained folder (RUN/final, RUN/checkpoints/step-N) "
                             "or RUN/checkpoints/latest")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    return parser


def run(args: argparse.Namespace) -> int:
    print(generate_text(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        device=args.device))
    return 0
