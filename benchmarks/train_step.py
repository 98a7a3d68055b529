"""Time a training step of a `matryoshka` adapter against a `lora` adapter at the same r_max, side by side.

Both kinds run on one wrapped model, one batch and one optimizer setting. They differ only in the training
diagonal, built as ``Trainer.training_diagonal`` builds it: P from the nested ranks S for matryoshka and the
constant s(r_max) for lora. Each repetition times one step of each kind, in an order that flips every repetition,
and the script prints the median step time of each kind and their ratio.

    python benchmarks/train_step.py                                   # SmolLM2-135M-Instruct, r_max 32
    python benchmarks/train_step.py --model PATH --repetitions 3 --batch-size 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch

from matlora_core.base_model import SMOLLM2_NAME, load_base_model
from matlora_core.cli import parse_int_list, parse_str_list
from matlora_core.config import DEFAULT_TARGET_MODULES, MatryoshkaConfig
from matlora_core.data import IGNORE_INDEX
from matlora_core.model import MatryoshkaModel
from matlora_core.ranks import nested_diagonal
from matlora_core.train import resolve_device

logger = logging.getLogger("benchmarks.train_step")

KINDS = ("matryoshka", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2_NAME, help=f"base model (default: {SMOLLM2_NAME})")
    parser.add_argument("--r-max", type=int, default=32, help="rank of the A and B factors (default: 32)")
    parser.add_argument("--ranks", type=parse_int_list, default=[1, 2, 4, 8, 16, 32],
                        help="nested ranks S of the matryoshka kind (default: 1,2,4,8,16,32)")
    parser.add_argument("--scale-rule", default="sqrt", help="rank scale s(r): none, rank or sqrt (default: sqrt)")
    parser.add_argument("--target-modules", type=parse_str_list, default=list(DEFAULT_TARGET_MODULES),
                        help="linear layers to adapt, comma-separated (default: all attention and MLP projections)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, the first half masked as "
                                                                 "prompt (default: 256)")
    parser.add_argument("--repetitions", type=int, default=10, help="timed steps per kind (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per kind first (default: 2)")
    parser.add_argument("--dtype", default="float32", help="base model dtype: float32 or bfloat16 (default: float32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter and the token batch (default: 0)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "repetitions"):
        if getattr(args, name) < 1:
            parser.error(f"invalid --{name.replace('_', '-')}={getattr(args, name)}: must be an integer >= 1")
    return args


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int, device: str) -> dict:
    """Return random tokens whose first half is masked out of the loss, as a prompt is."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def make_step(model: MatryoshkaModel, batch: dict, diagonal: torch.Tensor) -> Callable[[], None]:
    """Return one optimizer step as ``Trainer.train_step`` runs it with a single micro-batch."""
    parameters = model.adapter_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def step() -> None:
        with model.training_mode_diagonal(diagonal):
            loss = model(**batch).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_step(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    """Time both kinds and return each kind's step times in seconds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    loaded = load_base_model(args.model, dtype=args.dtype, device=device)
    trained_ranks = sorted({r for r in args.ranks if 1 <= r <= args.r_max})
    config = MatryoshkaConfig(r_max=args.r_max, trained_ranks=trained_ranks, scale_rule=args.scale_rule,
                              target_modules=args.target_modules)
    model = MatryoshkaModel(loaded.model, config)
    model.train()
    with torch.no_grad():
        for parameter in model.adapter_parameters():   # non-zero B, as after some training
            parameter.normal_(std=0.01)

    batch = synthetic_batch(loaded.model.config.vocab_size, args.batch_size, args.seq_len, args.seed, device)
    diagonals = {"matryoshka": model.training_diagonal(),
                 "lora": nested_diagonal([args.r_max], args.r_max, args.scale_rule)}
    steps = {kind: make_step(model, batch, diagonals[kind]) for kind in KINDS}
    for _ in range(args.warmup):
        for kind in KINDS:
            steps[kind]()

    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for repetition in range(args.repetitions):
        order = KINDS if repetition % 2 == 0 else KINDS[::-1]
        for kind in order:
            times[kind].append(time_step(steps[kind], device))
    logger.info("step times in s: %s", {kind: [round(t, 4) for t in values] for kind, values in times.items()})
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    times = run(args)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    device = resolve_device(args.device)
    trained_ranks = sorted({r for r in args.ranks if 1 <= r <= args.r_max})
    print(f"model {args.model}, r_max {args.r_max}, S {trained_ranks}, "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads), {args.repetitions} repetitions")
    for kind in KINDS:
        print(f"{kind:<11} median step {medians[kind] * 1000:9.1f} ms   (fastest {min(times[kind]) * 1000:.1f} ms)")
    ratio = medians["matryoshka"] / medians["lora"]
    print(f"ratio matryoshka / lora: {ratio:.3f} (target: <= 1.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
