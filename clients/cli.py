"""``matlora-client``: generate, chat, list ranks and check health from the command line.

Output is plain text unless ``--json`` is given. In plain mode the generated text goes to stdout and a line
about rank and tokens to stderr, so the text can be piped. For ``generate`` that line has the server's timings
too; chat responses, in OpenAI's format, carry none. ``--json`` prints the fields the server sent, nulls
included. Exit status: 0 on success, 1 when the request fails (the server's message is printed) or /health
reports anything but ok, 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from .arguments import server_url, timeout_seconds
from .base import DEFAULT_TIMEOUT_S, DEFAULT_URL
from .client import MatloraClient
from .errors import MatloraAPIError, MatloraError
from .retry import RetryPolicy

logger = logging.getLogger(__name__)

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Add the options that may come before or after the subcommand.

    On subcommands the defaults are SUPPRESS, so an option given there overrides the main parser's value
    and an option left out does not reset it.
    """
    url = os.environ.get("MATLORA_URL", DEFAULT_URL)
    options = (
        # argparse also passes a default given as text through `type`, so a malformed $MATLORA_URL exits 2 too.
        ("--url", {"type": server_url, "default": url}, f"server base URL (default: $MATLORA_URL or {DEFAULT_URL})"),
        ("--api-key", {"default": os.environ.get("MATLORA_API_KEY")}, "bearer token (default: $MATLORA_API_KEY)"),
        ("--timeout", {"type": timeout_seconds, "default": DEFAULT_TIMEOUT_S},
         f"seconds above 0 to wait for the connection and for each read (default: {DEFAULT_TIMEOUT_S:g})"),
        ("--max-retries", {"type": int, "default": 3}, "retries after HTTP 429 or a connection error (default: 3)"),
        ("--json", {"action": "store_true", "default": False}, "print JSON (one object per line when streaming)"),
    )
    for flag, settings, help_text in options:
        if suppress:
            settings = {**settings, "default": argparse.SUPPRESS}
        parser.add_argument(flag, help=help_text, **settings)


def generation_options(parser: argparse.ArgumentParser, max_tokens_help: str) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=int,
                        help="adapter rank, 0 for the base model (default: the server's default rank)")
    choice.add_argument("--latency-budget-ms", type=float,
                        help="budget per output token in ms, for which the server picks the largest rank "
                        "predicted to fit")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--max-tokens", type=int, help=max_tokens_help)
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 to 2 (default: 0, greedy)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass, above 0 up to 1")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--stop", action="append", help="stop string (repeat the option for several)")
    parser.add_argument("--ignore-eos", action="store_true", default=None,
                        help="generate past the end-of-sequence token, up to --max-tokens or a stop string")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matlora-client", description="Send requests to a matlora server and print "
                                     "the results.")
    global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", parents=[common], help="generate text with POST /generate")
    generate.add_argument("prompt", help="the prompt, sent as is (no chat template)")
    generation_options(generate, "output tokens at most (default: the server's default_max_tokens)")

    chat = commands.add_parser("chat", parents=[common], help="one chat turn with POST /v1/chat/completions")
    chat.add_argument("message", help="the user message")
    chat.add_argument("--system", help="a system message sent before the user message")
    generation_options(chat, "output tokens at most (default: the server's default_max_tokens)")

    commands.add_parser("ranks", parents=[common], help="offered ranks with quality and latency estimate")
    commands.add_parser("health", parents=[common], help="server status and queue sizes")
    commands.add_parser("models", parents=[common], help="the served base model and adapter")
    return parser


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    options["rank"] = args.rank
    options["latency_budget_ms"] = args.latency_budget_ms
    return options


def print_json(value: BaseModel | dict) -> None:
    """Print a response with the fields the server sent, nulls included, and none that it left out."""
    text = value.model_dump_json(exclude_unset=True) if isinstance(value, BaseModel) else json.dumps(value)
    print(text, flush=True)


def summary_line(rank: int, reason: str | None, completion_tokens: int | None, timings: Any = None) -> str:
    parts = [f"rank {rank}" + (f" ({reason})" if reason else "")]
    if completion_tokens is not None:
        parts.append(f"{completion_tokens} output tokens")
    if timings is not None:
        for label, value in (("TTFT", timings.time_to_first_token_ms), ("TPOT", timings.time_per_output_token_ms),
                             ("e2e", timings.e2e_ms)):
            if value is not None:
                parts.append(f"{label} {value:.1f} ms")
    return ", ".join(parts)


def run_generate(client: MatloraClient, args: argparse.Namespace) -> int:
    options = sampling_options(args)
    if not args.stream:
        response = client.generate(args.prompt, max_new_tokens=args.max_tokens, **options)
        if args.json:
            print_json(response)
        else:
            print(response.text)
            print(summary_line(response.rank, response.rank_reason, response.usage.completion_tokens, response.timings),
                  file=sys.stderr)
        return 0

    final = None
    for event in client.generate_stream(args.prompt, max_new_tokens=args.max_tokens, **options):
        if args.json:
            print_json(event)
        else:
            print(event.text, end="", flush=True)
        final = event
    if final is not None and not args.json:
        print()
        tokens = final.usage.completion_tokens if final.usage else None
        print(summary_line(final.rank, final.rank_reason, tokens, final.timings), file=sys.stderr)
    return 0


def run_chat(client: MatloraClient, args: argparse.Namespace) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.message})
    options = sampling_options(args)
    if not args.stream:
        response = client.chat(messages, max_tokens=args.max_tokens, **options)
        if args.json:
            print_json(response)
        else:
            print(response.choices[0].message.content)
            print(summary_line(response.rank, response.rank_reason, response.usage.completion_tokens), file=sys.stderr)
        return 0

    usage, last = None, None
    for chunk in client.chat_stream(messages, max_tokens=args.max_tokens, **options):
        last, usage = chunk, chunk.usage or usage
        if args.json:
            print_json(chunk)
        elif chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    if last is not None and not args.json:
        print()
        print(summary_line(last.rank, last.rank_reason, usage.completion_tokens if usage else None), file=sys.stderr)
    return 0


def ranks_table(rows: Iterable[Sequence[str]]) -> str:
    """Format the rows as right-aligned text columns, with the first row as the header."""
    rows = [list(row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def run_ranks(client: MatloraClient, args: argparse.Namespace) -> int:
    ranks = client.ranks()
    if args.json:
        print_json(ranks)
        return 0
    metric = next((entry.quality_metric for entry in ranks.data if entry.quality_metric), None)
    rows = [("rank", f"quality ({metric})" if metric else "quality", "latency estimate (ms/token)", "default")]
    for entry in ranks.data:
        quality = "-" if entry.quality is None else f"{entry.quality:.4g}"
        latency = "-" if entry.latency_estimate_ms is None else f"{entry.latency_estimate_ms:.2f}"
        rows.append((str(entry.rank), quality, latency, "*" if entry.is_default else ""))
    print(ranks_table(rows))
    print(f"inference rule: {ranks.inference_rule}; rank 0 is the base model")
    return 0


def run_health(client: MatloraClient, args: argparse.Namespace) -> int:
    health = client.health()
    if args.json:
        print_json(health)
    else:
        print(f"{health.status}: model {health.model}, adapter {health.adapter}, {health.running} running, "
              f"{health.waiting} waiting")
    return 0 if health.status == "ok" else 1


def run_models(client: MatloraClient, args: argparse.Namespace) -> int:
    models = client.models()
    if args.json:
        print_json(models)
        return 0
    for card in models.data:
        extra = f" (adapter of {card.parent}, ranks {card.offered_ranks}, default {card.default_rank})" \
            if card.parent else ""
        print(f"{card.id}{extra}")
    return 0


COMMANDS = {"generate": run_generate, "chat": run_chat, "ranks": run_ranks, "health": run_health,
            "models": run_models}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.max_retries < 0:
        parser.error(f"--max-retries must be 0 or more, got {args.max_retries}")
    try:
        with MatloraClient(args.url, api_key=args.api_key, timeout=args.timeout,
                           retry=RetryPolicy(max_retries=args.max_retries)) as client:
            return COMMANDS[args.command](client, args)
    except MatloraAPIError as error:
        if args.json:
            print_json({"error": {"message": error.message, "type": error.error_type, "param": error.param,
                                  "code": error.status, "request_id": error.request_id}})
        print(f"matlora-client: error: {error}", file=sys.stderr)
        return 1
    except (MatloraError, ValueError) as error:
        print(f"matlora-client: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
