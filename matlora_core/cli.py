"""The ``matlora`` command: train, eval, export and import nested-rank adapters."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

from .config import format_choices

logger = logging.getLogger("matlora")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rank list {text!r}: expected integers separated by commas") from None


def parse_str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected an integer >= 1")
    return value


def parse_log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid log level {text!r}: choose {format_choices(LOG_LEVELS)} "
                                         "(case-insensitive)")
    return level


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per dataclass field, with the field's help metadata and default."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        kind = hints[item.name]
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "")
        if item.metadata.get("required"):
            parser.add_argument(flag, dest=item.name, required=True, help=help_text)
            continue
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        base = args[0] if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else kind
        converter = {list[int]: parse_int_list, list[str]: parse_str_list}.get(base, base)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(flag, dest=item.name, type=converter, default=default,
                            help=f"{help_text} (default: {shown})")


def build_parser() -> argparse.ArgumentParser:
    from .base_model import DTYPES
    from .ranks import INFERENCE_RULES
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="matlora", description=__doc__)
    parser.add_argument("--log-level", type=parse_log_level, default="INFO",
                        help=f"logging level: {format_choices(LOG_LEVELS)}, case-insensitive (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a lora, dylora or matryoshka adapter")
    add_dataclass_options(train, TrainConfig)

    evaluate = commands.add_parser("eval", help="evaluate adapters at each rank: loss, accuracy, AURAC")
    evaluate.add_argument("--model", required=True, help="base model (built-in name, folder or hub id)")
    evaluate.add_argument("--adapter", action="append", required=True,
                          help="adapter folder; repeat to compare several in one table and picture")
    evaluate.add_argument("--label", action="append", help="display name per --adapter (default: folder name)")
    evaluate.add_argument("--data", required=True, help="JSON Lines file of question/answer objects")
    evaluate.add_argument("--limit", type=parse_positive_int, default=None,
                          help="evaluate only the first N examples, N >= 1 (default: all)")
    evaluate.add_argument("--ranks", type=parse_int_list, default=None,
                          help="ranks to evaluate, comma-separated (default: the adapter's offered ranks)")
    evaluate.add_argument("--rule", type=parse_str_list, action="append", default=None,
                          help="inference rules to evaluate: paper, partial_sum or both comma-separated; give it "
                               "once for all adapters or once per --adapter (default: each adapter's own rule)")
    evaluate.add_argument("--metrics", type=parse_str_list, default=["loss", "accuracy"],
                          help="loss (also accepted as answer_loss), accuracy or both, comma-separated "
                               "(default: loss,accuracy)")
    evaluate.add_argument("--batch-size", type=parse_positive_int, default=16,
                          help="sequences per forward for the loss, running rows for accuracy, >= 1 (default: 16)")
    evaluate.add_argument("--max-new-tokens", type=parse_positive_int, default=256,
                          help="generation limit for accuracy, in tokens, >= 1 (default: 256)")
    evaluate.add_argument("--dtype", choices=list(DTYPES), default="float32",
                          help=f"dtype of the base model and the adapter: {format_choices(DTYPES)}; float16 needs "
                               "a CUDA device (default: float32)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    evaluate.add_argument("--output", type=Path, default=None, help="write the results as JSON to this file")
    evaluate.add_argument("--plot", type=Path, default=None, help="write a PNG of the rank curves to this file")
    evaluate.add_argument("--write-profile", action="store_true",
                          help="store the per-rank results in each adapter's config, where the server reads them")
    evaluate.add_argument("--quality-metric", default=None,
                          help="with --write-profile: profile entry the server reports as quality, answer_loss "
                               "or accuracy; --metrics must measure it (default: accuracy when measured, "
                               "else answer_loss)")

    export = commands.add_parser("export", help="write one rank of an adapter as a plain PEFT LoRA adapter")
    export.add_argument("--adapter", required=True, help="Matryoshka adapter folder")
    export.add_argument("--rank", type=int, required=True, help="rank to export, 1..r_max")
    export.add_argument("--output", type=Path, required=True, help="folder of the PEFT adapter to write")
    export.add_argument("--rule", choices=INFERENCE_RULES, default=None,
                        help="inference rule whose rank-r diagonal is exported (default: the adapter's own)")
    export.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the written tensors (default: float32)")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter already in --output")

    importer = commands.add_parser("import", help="read a plain PEFT LoRA adapter as a one-rank Matryoshka adapter")
    importer.add_argument("--peft", required=True, help="PEFT LoRA adapter folder")
    importer.add_argument("--output", type=Path, required=True, help="folder of the Matryoshka adapter to write")
    importer.add_argument("--model", default=None,
                          help="base model to load the written adapter on as a check (built-in name, folder or hub id)")
    importer.add_argument("--overwrite", action="store_true", help="replace an adapter already in --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .adapter import AdapterError
    from .base_model import ModelLoadError
    from .data import DataFormatError

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "import":
            return run_import(args)
    except (AdapterError, ModelLoadError, DataFormatError, ValueError) as error:
        logger.error("%s", error)
        return 2
    except OSError as error:
        # A file system failure that no check caught first, such as a folder without write permission.
        logger.error("%s", describe_os_error(error))
        return 2
    return 1


def describe_os_error(error: OSError) -> str:
    """Return ``path: reason`` for an OSError that carries a file name, else its own message."""
    if error.filename is None or error.strerror is None:
        return str(error)
    return f"{error.filename}: {error.strerror}"


def run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    output = train(TrainConfig(**options))
    print(f"adapter written to {output}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate_cli import run_evaluation

    return run_evaluation(args)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from .peft_io import export_peft

    output = export_peft(args.adapter, args.rank, args.output, inference_rule=args.rule,
                         dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    print(f"PEFT adapter written to {output}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from .peft_io import import_peft

    config = import_peft(args.peft, args.output, overwrite=args.overwrite)
    if args.model:
        from .adapter import AdapterError, load_adapter
        from .base_model import load_base_model

        try:
            load_adapter(load_base_model(args.model).model, args.output)
        except (AdapterError, ValueError) as error:
            raise AdapterError(f"{args.output} was written but does not load on {args.model}: {error}") from None
        print(f"checked: the adapter loads on {args.model}")
    print(f"Matryoshka adapter written to {args.output}: rank {config.r_max}, scale rule {config.scale_rule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
