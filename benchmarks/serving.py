"""Serving throughput, side by side in one run: matlora (mixed ranks, all rank 0, batches split by rank),
`transformers serve --continuous-batching` on the base model, and transformers' static-batch `generate`.

Every system gets the same closed-loop load: ``--concurrency`` clients, each sending ``--requests-per-client``
GSM8K test questions with up to ``--max-tokens`` output tokens, in the same dtype. Systems are measured in
interleaved rounds and the medians are compared. The script also times one decode step of a batch entirely at
rank 4, and of a batch of mixed ranks, against one at rank 0.

    python benchmarks/serving.py --prompts path/to/gsm8k/test.jsonl --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTER = REPO / "adapters" / "smollm2-135m-gsm8k-matryoshka"


@dataclass
class LoadResult:
    output_tokens: int
    seconds: float
    errors: int

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_prompts(path: str, count: int, prompt_format: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            prompts.append(prompt_format.format(question=json.loads(line)["question"]))
            if len(prompts) == count:
                break
    return prompts


def start_process(command: list[str], url: str, log_path: Path, timeout: float = 600) -> subprocess.Popen:
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_process(process)
    raise RuntimeError(f"{command[0]} did not become healthy within {timeout:.0f} s; see {log_path}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


async def closed_loop(url: str, bodies: list[dict], concurrency: int) -> LoadResult:
    """Send every body to /v1/completions from ``concurrency`` workers; count output tokens from usage."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    tokens, errors = 0, 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while not queue.empty():
            body = queue.get_nowait()
            response = await client.post(url + "/v1/completions", json=body)
            if response.status_code != 200:
                errors += 1
                print(f"  error {response.status_code}: {response.text[:200]}", file=sys.stderr)
                continue
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return LoadResult(tokens, seconds, errors)


def static_generate(model, tokenizer, prompts: list[str], max_tokens: int) -> LoadResult:
    """One static batch through transformers' generate, no adapter: the raw-model reference."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    return LoadResult(int((output.shape[1] - encoded["input_ids"].shape[1]) * len(prompts)), seconds, 0)


@dataclass
class StepTimes:
    """Seconds of one decode step per batch kind, one entry per repetition."""

    seconds: dict[str, list[float]]

    def median(self, kind: str) -> float:
        return statistics.median(self.seconds[kind])

    def ratio(self, kind: str) -> float:
        """Median over repetitions of this kind's step divided by the rank-0 step of the same repetition."""
        return statistics.median(a / b for a, b in zip(self.seconds[kind], self.seconds["rank 0"]))


def time_decode_steps(args: argparse.Namespace, repetitions: int) -> StepTimes:
    """Time one decode step of the same batch at rank 0, at rank 4 and at the offered ranks mixed.

    Each repetition runs the three in a fresh random order, so that neither drift of the machine nor the order
    of the steps favours one kind. Ratios are taken within a repetition, and their median is reported.
    """
    from matlora_core import load_adapter
    from matlora_core.base_model import load_base_model
    from matlora_server.engine import Engine, SchedulerConfig

    loaded = load_base_model(args.model, dtype=args.dtype)
    model = load_adapter(loaded.model, args.adapter, dtype=loaded.model.dtype)
    model.eval()
    engine = Engine(model, loaded.tokenizer, SchedulerConfig(max_num_seqs=args.concurrency, max_model_len=512))
    batch = args.concurrency
    offered = model.config.offered_ranks
    kinds = {"rank 0": [0] * batch, "rank 4": [4] * batch,
             "mixed": [offered[row % len(offered)] for row in range(batch)]}
    engine.runner.prefill(0, [[1] * 96] * batch, [0] * batch)
    order = random.Random(args.step_seed)
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repetitions):
        for kind in order.sample(list(kinds), len(kinds)):
            for slot in range(batch):
                engine.cache.lengths[slot] = 96
            started = time.perf_counter()
            engine.runner.decode([1] * batch, kinds[kind])
            seconds[kind].append(time.perf_counter() - started)
    return StepTimes(seconds)


def time_decode_steps_in_processes(args: argparse.Namespace) -> list[StepTimes]:
    """Run :func:`time_decode_steps` in ``--step-processes`` fresh processes, one after another.

    A process fixes where the weights and the KV cache sit in memory, and that placement moves the ratio by a
    few percent from one process to the next, so one process alone is a sample of one.
    """
    runs = []
    for index in range(args.step_processes):
        command = [sys.executable, __file__, "--prompts", args.prompts, "--step-worker", "--model", args.model,
                   "--adapter", args.adapter, "--dtype", args.dtype, "--concurrency", str(args.concurrency),
                   "--step-repetitions", str(args.step_repetitions), "--step-seed", str(index)]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
        if finished.returncode != 0 or not lines:
            raise RuntimeError(f"decode step timing failed (exit {finished.returncode}): {finished.stderr[-2000:]}")
        runs.append(StepTimes(json.loads(lines[-1])))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="GSM8K-style JSON Lines file (question field)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (default: %(default)s)")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="adapter folder (default: the bundled one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default: 16)")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--split-rounds", type=int, default=1,
                        help="rounds of the split-by-rank load, which is several times slower (default: 1)")
    parser.add_argument("--skip-transformers-serve", action="store_true", help="leave out `transformers serve`")
    parser.add_argument("--log-dir", default="/tmp/matlora-bench", help="server logs (default: %(default)s)")
    parser.add_argument("--step-only", action="store_true",
                        help="time only the decode steps at rank 0, rank 4 and mixed ranks (about 80 s), with no load")
    parser.add_argument("--step-repetitions", type=int, default=61,
                        help="interleaved repetitions of the decode step timing per process (default: %(default)s)")
    parser.add_argument("--step-processes", type=int, default=3,
                        help="fresh processes that each time the decode steps (default: %(default)s)")
    parser.add_argument("--step-seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step_worker:
        print(json.dumps(time_decode_steps(args, args.step_repetitions).seconds))
        return 0
    if args.step_only:
        print_step_ratios(args, time_decode_steps_in_processes(args))
        return 0

    from matlora_core import read_config
    from matlora_core.base_model import load_base_model, materialize_smollm2

    config = read_config(args.adapter)
    count = args.concurrency * args.requests_per_client
    prompts = load_prompts(args.prompts, count, config.prompt_format)
    ranks = config.offered_ranks
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    model_folder = str(materialize_smollm2()) if args.model == "smollm2-135m-instruct" else args.model

    common = {"max_tokens": args.max_tokens, "temperature": 0}
    loads = {
        "matlora mixed ranks": [{**common, "prompt": p, "rank": ranks[i % len(ranks)], "ignore_eos": True}
                                for i, p in enumerate(prompts)],
        "matlora all rank 0": [{**common, "prompt": p, "rank": 0, "ignore_eos": True} for p in prompts],
        "matlora split by rank": [{**common, "prompt": p, "rank": ranks[i % len(ranks)], "ignore_eos": True}
                                  for i, p in enumerate(prompts)],
        "transformers serve (base)": [{**common, "prompt": p, "model": model_folder} for p in prompts],
    }

    servers: dict[str, str] = {}
    processes = []
    try:
        for name, batching in (("mixed", "mixed"), ("split", "split")):
            port = free_port()
            command = [sys.executable, "-m", "matlora_server", "--model", args.model, "--adapter", args.adapter,
                       "--dtype", args.dtype, "--port", str(port), "--rank-batching", batching,
                       "--max-num-seqs", str(args.concurrency), "--profile-steps", "1", "--log-level", "WARNING"]
            processes.append(start_process(command, f"http://127.0.0.1:{port}", log_dir / f"matlora-{name}.log"))
            servers[name] = f"http://127.0.0.1:{port}"
        if not args.skip_transformers_serve:
            port = free_port()
            command = ["transformers", "serve", "--continuous-batching", "--dtype", args.dtype, "--device", "cpu",
                       "--host", "127.0.0.1", "--port", str(port), model_folder]
            processes.append(start_process(command, f"http://127.0.0.1:{port}", log_dir / "transformers-serve.log"))
            servers["transformers"] = f"http://127.0.0.1:{port}"
        targets = {"matlora mixed ranks": servers["mixed"], "matlora all rank 0": servers["mixed"],
                   "matlora split by rank": servers["split"], "transformers serve (base)": servers.get("transformers")}

        static = load_base_model(args.model, dtype=args.dtype)
        results: dict[str, list[LoadResult]] = {name: [] for name in [*loads, "static generate (no adapter)"]}
        warm = [{**common, "prompt": prompts[0], "max_tokens": 4}]
        for name, url in targets.items():
            if url:
                asyncio.run(closed_loop(url, warm, 1))
        for round_index in range(args.rounds):
            for name, bodies in loads.items():
                if targets[name] is None or (name == "matlora split by rank" and round_index >= args.split_rounds):
                    continue
                result = asyncio.run(closed_loop(targets[name], bodies, args.concurrency))
                results[name].append(result)
                print(f"round {round_index + 1} {name}: {result.tokens_per_second:.1f} output tokens/s "
                      f"({result.output_tokens} tokens in {result.seconds:.1f} s, {result.errors} errors)")
            for start in range(0, len(prompts), args.concurrency):
                result = static_generate(static.model, static.tokenizer, prompts[start:start + args.concurrency],
                                         args.max_tokens)
                results["static generate (no adapter)"].append(result)
            print(f"round {round_index + 1} static generate: "
                  f"{results['static generate (no adapter)'][-1].tokens_per_second:.1f} output tokens/s")
    finally:
        for process in processes:
            stop_process(process)

    report(results, args, time_decode_steps_in_processes(args))
    return 0


def report(results: dict[str, list[LoadResult]], args: argparse.Namespace, steps: list[StepTimes]) -> None:
    median = {name: statistics.median(r.tokens_per_second for r in runs) for name, runs in results.items() if runs}
    print(f"\nmedian output tokens/s, dtype {args.dtype}, {args.concurrency} clients, "
          f"{args.max_tokens} output tokens, {args.rounds} rounds")
    for name, value in median.items():
        print(f"  {name:<32} {value:8.1f}")
    mixed = median["matlora mixed ranks"]
    checks = [("mixed / transformers serve (base)", "transformers serve (base)", 1.5),
              ("mixed / static generate (no adapter)", "static generate (no adapter)", 0.8),
              ("mixed / split by rank", "matlora split by rank", 4.0),
              ("mixed / all rank 0", "matlora all rank 0", 0.92)]
    print("\nratios (target in brackets)")
    for label, other, target in checks:
        if other in median:
            ratio = mixed / median[other]
            print(f"  {label:<44} {ratio:6.2f}  (>= {target}) {'met' if ratio >= target else 'NOT met'}")
    print_step_ratios(args, steps)


def print_step_ratios(args: argparse.Namespace, runs: list[StepTimes]) -> None:
    """Print the step ratios of each process and their median, which is what the target is checked on."""
    batch = f"(batch {args.concurrency})"
    for kind, label, target in (("rank 4", "rank 4 / rank 0", 1.05), ("mixed", "mixed ranks / rank 0", None)):
        ratios = [run.ratio(kind) for run in runs]
        ratio = statistics.median(ratios)
        verdict = "(no target)" if target is None else f"(<= {target}) {'met' if ratio <= target else 'NOT met'}"
        milliseconds = ", ".join(f"{run.median('rank 0') * 1000:.1f}/{run.median(kind) * 1000:.1f}" for run in runs)
        print(f"  {'decode step ' + label + ' ' + batch:<44} {ratio:6.3f}  {verdict}  "
              f"[per process: {', '.join(f'{r:.3f}' for r in ratios)}; ms rank 0/{kind}: {milliseconds}]")


if __name__ == "__main__":
    sys.exit(main())
