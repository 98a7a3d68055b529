"""``matlora eval``: evaluate adapters at each rank and write the table, JSON, picture and profile."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .adapter import load_adapter, read_config, write_config
from .base_model import load_base_model
from .data import load_examples
from .evaluate import CurveResult, evaluate_curve
from .ranks import INFERENCE_RULES
from .report import format_table, plot_curves, write_json
from .train import resolve_device

logger = logging.getLogger(__name__)


def run_evaluation(args: argparse.Namespace) -> int:
    for metric in args.metrics:
        if metric not in ("loss", "accuracy"):
            raise ValueError(f"invalid --metrics entry {metric!r}: allowed values are loss, accuracy")
    for rules in args.rule or []:
        for rule in rules:
            if rule not in INFERENCE_RULES:
                raise ValueError(f"invalid --rule entry {rule!r}: allowed values are {', '.join(INFERENCE_RULES)}")
    if args.rule and len(args.rule) not in (1, len(args.adapter)):
        raise ValueError(f"got {len(args.rule)} --rule values for {len(args.adapter)} --adapter values: "
                         "give one for all adapters or one per adapter")
    if args.label and len(args.label) != len(args.adapter):
        raise ValueError(f"got {len(args.label)} --label values for {len(args.adapter)} --adapter values")
    device = resolve_device(args.device)

    curves: list[CurveResult] = []
    examples_by_format: dict[str, list] = {}
    # Rank 0 is the base model whatever the adapter, so it is evaluated once per prompt format.
    base_results_by_format: dict[str, dict] = {}
    for index, adapter_dir in enumerate(args.adapter):
        label = args.label[index] if args.label else Path(adapter_dir).name
        loaded = load_base_model(args.model, dtype=args.dtype, device=device)
        model = load_adapter(loaded.model, adapter_dir, dtype=loaded.model.dtype)
        model.eval()
        prompt_format = model.config.prompt_format
        if prompt_format not in examples_by_format:
            examples_by_format[prompt_format] = load_examples(args.data, prompt_format, limit=args.limit)
        examples = examples_by_format[prompt_format]
        ranks = args.ranks or model.config.offered_ranks
        for rank in ranks:
            if not 0 <= rank <= model.config.r_max:
                raise ValueError(f"invalid --ranks entry {rank}: {adapter_dir} has r_max={model.config.r_max}")
        rules = [model.config.inference_rule]
        if args.rule:
            rules = args.rule[index] if len(args.rule) > 1 else args.rule[0]
        adapter_curves = []
        for rule in rules:
            adapter_curves.append(evaluate_curve(
                model, loaded.tokenizer, examples, ranks, label=label, adapter=str(adapter_dir), inference_rule=rule,
                metrics=args.metrics, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                base_results=base_results_by_format.setdefault(prompt_format, {}),
            ))
        curves.extend(adapter_curves)
        if args.write_profile:
            write_profile(adapter_dir, adapter_curves, args, len(examples))

    print(format_table(curves))
    meta = {"model": args.model, "data": str(args.data), "examples": len(examples or []), "dtype": args.dtype}
    if args.output:
        write_json(curves, args.output, meta)
        print(f"results written to {args.output}")
    if args.plot:
        plot_curves(curves, args.plot, title=f"{args.model} on {Path(args.data).name} ({len(examples or [])} examples)")
        print(f"rank curves drawn in {args.plot}")
    return 0


def write_profile(adapter_dir: str, curves: list[CurveResult], args: argparse.Namespace, examples: int) -> None:
    """Store the curve of the adapter's own inference rule as its per-rank profile."""
    config = read_config(adapter_dir)
    matching = [c for c in curves if c.inference_rule == config.inference_rule]
    if not matching:
        raise ValueError(f"--write-profile: {adapter_dir} is served with inference rule {config.inference_rule!r}, "
                         f"which was not evaluated; add it to --rule")
    for result in matching[0].ranks:
        entry = config.profile.setdefault(result.rank, {})
        if result.answer_loss is not None:
            entry["answer_loss"] = round(result.answer_loss, 5)
        if result.accuracy is not None:
            entry["accuracy"] = round(result.accuracy, 5)
    metric = args.quality_metric or ("accuracy" if "accuracy" in args.metrics else "answer_loss")
    if metric not in ("answer_loss", "accuracy"):
        raise ValueError(f"invalid --quality-metric {metric!r}: allowed values are answer_loss, accuracy")
    config.quality_metric = metric
    config.training.setdefault("evaluation", {}).update(
        {"data": Path(args.data).name, "examples": examples, "dtype": args.dtype})
    write_config(config, adapter_dir)
    logger.info("wrote the %s profile of %s into its config", config.inference_rule, adapter_dir)
