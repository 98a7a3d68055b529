"""``matlora-bench``: a load generator that measures TTFT, TPOT and end-to-end latency per rank.

It drives a matlora server through streamed POST /generate, or any OpenAI-compatible server through streamed
POST /v1/completions (``--openai-base-url``). Results go to PREFIX.csv and PREFIX.json. ``--sweep`` runs every
offered rank in turn and adds PREFIX.png and PREFIX.md.

Exit status: 0 when the run completed and at least one request succeeded, because failed requests are counted,
not fatal. 1 when the run could not start, or when every request failed (in a sweep, every request at some
rank). 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from matlora_server.api.schemas import RanksResponse

from .arguments import server_url, timeout_seconds
from .base import DEFAULT_TIMEOUT_S, DEFAULT_URL
from .bench_load import LoadResult, StopRule, run_closed_loop, run_open_loop
from .bench_report import error_counts, format_table, summary_rows, write_csv, write_json
from .bench_sweep import plot_sweep, sweep_markdown, sweep_rows
from .bench_targets import MatloraTarget, OpenAITarget, RequestRecord
from .bench_workload import (DEFAULT_PROMPT_FORMAT, Workload, builtin_prompts, check_prompt_format, load_prompts,
                             parse_rank_mix)
from .errors import MatloraError

logger = logging.getLogger(__name__)

DEFAULT_NUM_REQUESTS = 100  # when neither --duration nor --num-requests is given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matlora-bench", description="Load generator that measures TTFT, TPOT "
                                     "and end-to-end latency per rank.")
    target = parser.add_argument_group("target")
    target.add_argument("--url", type=server_url, default=os.environ.get("MATLORA_URL", DEFAULT_URL),
                        help=f"matlora server base URL (default: $MATLORA_URL or {DEFAULT_URL})")
    target.add_argument("--api-key", default=os.environ.get("MATLORA_API_KEY"),
                        help="bearer token (default: $MATLORA_API_KEY)")
    target.add_argument("--openai-base-url", type=server_url, help="drive an OpenAI-compatible server through streamed "
                        "/completions instead, given with its /v1 prefix as in http://127.0.0.1:8000/v1")
    target.add_argument("--model", help="model name for --openai-base-url (default: the adapter of a matlora "
                        "server, else the first model in /models)")
    target.add_argument("--timeout", type=timeout_seconds, default=DEFAULT_TIMEOUT_S,
                        help="seconds above 0 to wait for the connection and for each read (default: %(default)s)")

    load = parser.add_argument_group("load")
    shape = load.add_mutually_exclusive_group()
    shape.add_argument("--concurrency", type=int, default=4,
                       help="closed loop: requests in flight at all times (default: %(default)s)")
    shape.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    load.add_argument("--duration", type=float, help="seconds after which no new request starts")
    load.add_argument("--num-requests", type=int,
                      help=f"requests to send (default: {DEFAULT_NUM_REQUESTS} when --duration is not given)")
    load.add_argument("--seed", type=int, default=0, help="seed of the rank draws and arrival times")

    requests = parser.add_argument_group("requests")
    rank = requests.add_mutually_exclusive_group()
    rank.add_argument("--rank-mix", help="ranks and weights, as in 4:0.5,16:0.3,64:0.2 (weights are normalised)")
    rank.add_argument("--latency-budget-ms", type=float, help="budget per output token sent with every request")
    rank.add_argument("--sweep", action="store_true", help="run every offered rank in turn and plot the trade-off")
    requests.add_argument("--prompts", help="JSON Lines file with a 'prompt' or 'question' field per line "
                          "(default: a built-in list of 8 word problems)")
    requests.add_argument("--prompt-format", default=DEFAULT_PROMPT_FORMAT,
                          help="how a 'question' becomes a prompt (default: %(default)r)")
    requests.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    requests.add_argument("--ignore-eos", action="store_true",
                          help="send ignore_eos, so that every request generates --max-tokens tokens unless a stop "
                          "string ends it")

    output = parser.add_argument_group("output")
    output.add_argument("--output-prefix", default="matlora-bench",
                        help="write PREFIX.csv and PREFIX.json (and PREFIX.png, PREFIX.md with --sweep)")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


@dataclass(frozen=True)
class Inputs:
    """The prompts and the rank mix that the arguments name, read and checked before any request is sent."""

    prompts: list[str]
    rank_mix: dict[int, float] | None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Inputs:
    """Check the arguments and read the prompts; an invalid one ends the program with exit status 2."""
    if args.duration is None and args.num_requests is None:
        args.num_requests = DEFAULT_NUM_REQUESTS
    for name in ("concurrency", "num_requests", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more, got {value}")
    for name in ("rate", "duration", "latency_budget_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be above 0, got {value}")
    if args.model and not args.openai_base_url:
        parser.error("--model applies only with --openai-base-url")
    try:
        check_prompt_format(args.prompt_format)
        prompts = load_prompts(args.prompts, args.prompt_format) if args.prompts else builtin_prompts(
            args.prompt_format)
        rank_mix = parse_rank_mix(args.rank_mix) if args.rank_mix else None
    except ValueError as error:
        parser.error(str(error))
    return Inputs(prompts, rank_mix)


async def open_target(args: argparse.Namespace) -> MatloraTarget | OpenAITarget:
    if not args.openai_base_url:
        return MatloraTarget(args.url, args.api_key, args.timeout, args.max_tokens, args.ignore_eos)
    target = OpenAITarget(args.openai_base_url, args.api_key, args.timeout, args.max_tokens, args.model,
                          args.ignore_eos)
    try:
        await target.connect()
    except BaseException:
        await target.aclose()
        raise
    return target


def build_workload(args: argparse.Namespace, inputs: Inputs, target, ranks: RanksResponse | None) -> Workload:
    mix = inputs.rank_mix
    budget = args.latency_budget_ms
    if not target.is_matlora and (mix or budget is not None or args.ignore_eos):
        logger.warning("%s is not a matlora server: sending no rank, latency budget or ignore_eos",
                       target.describe())
        mix, budget = None, None
    if mix and ranks is not None:
        offered = [entry.rank for entry in ranks.data]
        unknown = sorted(set(mix) - set(offered))
        if unknown:
            raise ValueError(f"--rank-mix: rank(s) {unknown} are not offered; choose from {offered}")
    return Workload(inputs.prompts, rank_mix=mix, latency_budget_ms=budget, seed=args.seed)


async def run_load(args: argparse.Namespace, target, workload: Workload) -> LoadResult:
    stop = StopRule(duration_s=args.duration, num_requests=args.num_requests)
    progress = not args.no_progress
    if args.rate is not None:
        return await run_open_loop(target, workload, stop, args.rate, seed=args.seed, progress=progress)
    return await run_closed_loop(target, workload, stop, args.concurrency, progress=progress)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings = {key: value for key, value in vars(args).items() if key not in ("api_key", "no_progress")}
    settings["load"] = "open" if args.rate is not None else "closed"
    return settings


@dataclass(frozen=True)
class Outcome:
    """The console summary of a run, and why it failed as a whole (None when some request succeeded)."""

    table: str
    failure: str | None = None


def all_failed(records: list[RequestRecord]) -> bool:
    return not any(record.ok for record in records)


def by_status(records: list[RequestRecord]) -> str:
    return ", ".join(f"{status}: {count}" for status, count in error_counts(records).items())


async def run_single(args: argparse.Namespace, target, workload: Workload, prefix: Path) -> Outcome:
    result = await run_load(args, target, workload)
    rows = summary_rows(result.records, result.duration_s)
    write_csv(rows, prefix.with_name(prefix.name + ".csv"))
    write_json({"settings": settings_of(args), "target": target.describe(), "duration_s": result.duration_s,
                "errors_by_status": error_counts(result.records), "summary": rows,
                "requests": [record.to_dict() for record in result.records]},
               prefix.with_name(prefix.name + ".json"))
    table = format_table(rows)
    if error_counts(result.records):
        table += "\nfailed requests by HTTP status: " + by_status(result.records)
    if all_failed(result.records):
        return Outcome(table, f"all {len(result.records)} requests failed (by HTTP status: "
                              f"{by_status(result.records)})")
    return Outcome(table)


async def run_sweep(args: argparse.Namespace, target, workload: Workload, ranks: RanksResponse | None,
                    prefix: Path) -> Outcome:
    if ranks is None:
        raise ValueError(f"--sweep needs a matlora server, and {target.describe()} is not one")
    results: dict[int, LoadResult] = {}
    for entry in ranks.data:
        logger.info("sweep: rank %d", entry.rank)
        results[entry.rank] = await run_load(args, target, workload.with_rank(entry.rank))
    rows = sweep_rows(results, ranks)
    table = sweep_markdown(rows)
    write_csv(rows, prefix.with_name(prefix.name + ".csv"))
    write_json({"settings": settings_of(args), "target": target.describe(), "sweep": rows,
                "runs": {str(rank): {"duration_s": result.duration_s, "errors_by_status": error_counts(result.records),
                                     "requests": [record.to_dict() for record in result.records]}
                         for rank, result in results.items()}},
               prefix.with_name(prefix.name + ".json"))
    prefix.with_name(prefix.name + ".md").write_text(table, encoding="utf-8")
    load = f"{args.rate} req/s" if args.rate is not None else f"concurrency {args.concurrency}"
    plot_sweep(rows, prefix.with_name(prefix.name + ".png"), f"rank sweep, {load}, {args.max_tokens} output tokens")
    failed_ranks = [rank for rank, result in results.items() if all_failed(result.records)]
    if failed_ranks:
        return Outcome(table, f"every request failed at rank(s) {failed_ranks}")
    return Outcome(table)


async def run(args: argparse.Namespace, inputs: Inputs) -> Outcome:
    """Run the benchmark and return the summary to print."""
    target = await open_target(args)
    try:
        ranks = await target.ranks()
        workload = build_workload(args, inputs, target, ranks)
        prefix = Path(args.output_prefix)
        logger.info("target: %s", target.describe())
        if args.sweep:
            return await run_sweep(args, target, workload, ranks, prefix)
        return await run_single(args, target, workload, prefix)
    finally:
        await target.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    inputs = check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # httpx logs every request at INFO
    try:
        outcome = asyncio.run(run(args, inputs))
    except (MatloraError, httpx.HTTPError, ValueError, OSError) as error:
        print(f"matlora-bench: error: {error}", file=sys.stderr)
        return 1
    print(outcome.table)
    print(f"results: {args.output_prefix}.csv, {args.output_prefix}.json"
          + (f", {args.output_prefix}.png, {args.output_prefix}.md" if args.sweep else ""))
    if outcome.failure is not None:
        print(f"matlora-bench: error: {outcome.failure}; {args.output_prefix}.json has each request's error",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
