"""``matlora eval``: evaluate adapters at each rank and write the table, JSON, picture and profile."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from .adapter import load_adapter, read_config, write_config
from .base_model import load_base_model
from .config import format_choices
from .data import load_examples
from .evaluate import CurveResult, RankResult, evaluate_curve
from .ranks import INFERENCE_RULES
from .report import format_table, plot_curves, write_json
from .train import resolve_device

logger = logging.getLogger(__name__)

# --metrics entries and the measurement each one names in evaluate_curve.
METRIC_NAMES = {"loss": "loss", "answer_loss": "loss", "accuracy": "accuracy"}
# Profile entries that --quality-metric can choose, and the measurement each one needs.
QUALITY_METRICS = {"answer_loss": "loss", "accuracy": "accuracy"}


@dataclass
class AdapterPlan:
    """The label, ranks and inference rules of one --adapter, settled before any model loads."""

    directory: str
    label: str
    ranks: list[int]
    rules: list[str]


def run_evaluation(args: argparse.Namespace) -> int:
    metrics = check_metrics(args)
    device = resolve_device(args.device)
    if args.dtype == "float16" and not device.startswith("cuda"):
        raise ValueError(f"--dtype float16 needs a CUDA device, but the device is {device}: use float32 or bfloat16 "
                         "on CPU")
    plans = plan_adapters(args)

    curves: list[CurveResult] = []
    examples_by_format: dict[str, list] = {}
    # Rank 0 is the base model whatever the adapter, so it is evaluated once per prompt format.
    base_results_by_format: dict[str, dict] = {}
    for plan in plans:
        loaded = load_base_model(args.model, dtype=args.dtype, device=device)
        model = load_adapter(loaded.model, plan.directory, dtype=loaded.model.dtype)
        model.eval()
        prompt_format = model.config.prompt_format
        if prompt_format not in examples_by_format:
            examples_by_format[prompt_format] = load_examples(args.data, prompt_format, limit=args.limit)
        examples = examples_by_format[prompt_format]

        adapter_curves = []
        for rule in plan.rules:
            adapter_curves.append(evaluate_curve(
                model, loaded.tokenizer, examples, plan.ranks, label=plan.label, adapter=plan.directory,
                inference_rule=rule, metrics=metrics, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                base_results=base_results_by_format.setdefault(prompt_format, {}),
            ))
        curves.extend(adapter_curves)
        if args.write_profile:
            write_profile(plan.directory, adapter_curves, args, len(examples))

    print(format_table(curves))
    meta = {"model": args.model, "data": str(args.data), "examples": len(examples), "dtype": args.dtype}
    if args.output:
        write_json(curves, args.output, meta)
        print(f"results written to {args.output}")
    if args.plot:
        plot_curves(curves, args.plot, title=f"{args.model} on {Path(args.data).name} ({len(examples)} examples)")
        print(f"rank curves drawn in {args.plot}")
    return 0


def check_metrics(args: argparse.Namespace) -> list[str]:
    """Check --metrics and --quality-metric; return the measurements to run, named as evaluate_curve names them."""
    if not args.metrics:
        raise ValueError("--metrics is empty: give loss, accuracy or both")
    for metric in args.metrics:
        if metric not in METRIC_NAMES:
            raise ValueError(f"--metrics entry {metric!r} is invalid: choose {format_choices(METRIC_NAMES)}")
    metrics = sorted({METRIC_NAMES[metric] for metric in args.metrics}, key=["loss", "accuracy"].index)

    quality = args.quality_metric
    if quality is None:
        return metrics
    if not args.write_profile:
        raise ValueError("--quality-metric chooses the quality figure of the profile, so it needs --write-profile")
    if quality not in QUALITY_METRICS:
        raise ValueError(f"--quality-metric {quality!r} is invalid: choose {format_choices(QUALITY_METRICS)}")
    if QUALITY_METRICS[quality] not in metrics:
        raise ValueError(f"--quality-metric {quality} is not measured by --metrics {','.join(args.metrics)}: "
                         f"add {QUALITY_METRICS[quality]} to --metrics")
    return metrics


def plan_adapters(args: argparse.Namespace) -> list[AdapterPlan]:
    """Check --rule, --label and --ranks against each adapter's config, so that a mistake fails before evaluating."""
    for rules in args.rule or []:
        for rule in rules:
            if rule not in INFERENCE_RULES:
                raise ValueError(f"--rule entry {rule!r} is invalid: choose {format_choices(INFERENCE_RULES)}")
    if args.rule and len(args.rule) not in (1, len(args.adapter)):
        raise ValueError(f"got {len(args.rule)} --rule values for {len(args.adapter)} --adapter values: "
                         "give one for all adapters or one per adapter")
    if args.label and len(args.label) != len(args.adapter):
        raise ValueError(f"got {len(args.label)} --label values for {len(args.adapter)} --adapter values")

    plans = []
    for index, adapter_dir in enumerate(args.adapter):
        config = read_config(adapter_dir)
        ranks = args.ranks or config.offered_ranks
        for rank in ranks:
            if not 0 <= rank <= config.r_max:
                raise ValueError(f"--ranks entry {rank} is invalid: {adapter_dir} has r_max={config.r_max}, so "
                                 f"choose ranks in 0..{config.r_max}")
        rules = [config.inference_rule]
        if args.rule:
            rules = args.rule[index] if len(args.rule) > 1 else args.rule[0]
        if args.write_profile and config.inference_rule not in rules:
            raise ValueError(f"--write-profile: {adapter_dir} is served with inference rule {config.inference_rule!r}, "
                             f"which is not evaluated; add it to --rule")
        label = args.label[index] if args.label else Path(adapter_dir).name
        plans.append(AdapterPlan(directory=str(adapter_dir), label=label, ranks=list(ranks), rules=list(rules)))
    return plans


def write_profile(adapter_dir: str, curves: list[CurveResult], args: argparse.Namespace, examples: int) -> None:
    """Replace the adapter's profile with the curve of its own inference rule from this evaluation.

    Every entry of the written profile comes from this run, so no value of an earlier run with other data, ranks
    or metrics is left beside the new ones.
    """
    config = read_config(adapter_dir)
    curve = next(c for c in curves if c.inference_rule == config.inference_rule)   # plan_adapters checked it
    config.profile = {result.rank: profile_entry(result) for result in curve.ranks}
    measured = {metric for entry in config.profile.values() for metric in entry}
    config.quality_metric = args.quality_metric or ("accuracy" if "accuracy" in measured else "answer_loss")
    config.training["evaluation"] = {
        "data": Path(args.data).name,
        "examples": examples,
        "dtype": args.dtype,
        "inference_rule": config.inference_rule,
        "metrics": sorted(measured),
    }
    write_config(config, adapter_dir)
    logger.info("wrote the %s profile of %s into its config: ranks %s, quality metric %s",
                config.inference_rule, adapter_dir, sorted(config.profile), config.quality_metric)


def profile_entry(result: RankResult) -> dict[str, float]:
    entry = {}
    if result.answer_loss is not None:
        entry["answer_loss"] = round(result.answer_loss, 5)
    if result.accuracy is not None:
        entry["accuracy"] = round(result.accuracy, 5)
    return entry
