"""Make the bundled adapter from the final Matryoshka run and its two evaluations.

The adapter is served with the inference rule whose loss curve has the lower log2 AURAC on the test questions.
That rule's per-rank loss and accuracy become its profile, which the server reports in /v1/ranks. The answer-token
loss is the quality figure, because it is measured on more questions and ranks than the accuracy and varies far
less by chance.

    python experiments/gsm8k/package_adapter.py RUN_DIR LOSS_JSON TARGET_DIR [--accuracy ACCURACY_JSON]
    python experiments/gsm8k/package_adapter.py --add-accuracy TARGET_DIR ACCURACY_JSON

The second form adds a later accuracy evaluation to an adapter already packaged, under the rule it is served with,
and leaves its weights, rule and loss profile as they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from matlora_core import read_config
from matlora_core.adapter import write_config
from matlora_core.config import CONFIG_NAME, WEIGHTS_NAME


def matryoshka_curves(path: str) -> dict[str, dict]:
    """Return the curves labelled Matryoshka in the evaluation file ``path``, keyed by inference rule."""
    results = json.loads(Path(path).read_text())
    curves = {c["inference_rule"]: dict(c, examples=results["examples"], dtype=results["dtype"])
              for c in results["curves"] if c["label"] == "Matryoshka"}
    if not curves:
        raise SystemExit(f"{path}: no curve labelled Matryoshka: run matlora eval with --label Matryoshka")
    return curves


def main(run_dir: str, loss_json: str, target_dir: str, accuracy_json: str | None = None) -> int:
    loss_curves = matryoshka_curves(loss_json)
    accuracy_curves = matryoshka_curves(accuracy_json) if accuracy_json else {}
    rule = min(loss_curves, key=lambda r: loss_curves[r]["aurac"]["answer_loss"]["log2"])
    loss, accuracy = loss_curves[rule], accuracy_curves.get(rule)
    accuracy_by_rank = {r["rank"]: r["accuracy"] for r in accuracy["ranks"]} if accuracy else {}

    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copy(Path(run_dir) / name, target / name)

    config = read_config(target)
    config.inference_rule = rule
    config.quality_metric = "answer_loss"
    config.profile = {}
    for entry in loss["ranks"]:
        metrics = {"answer_loss": round(entry["answer_loss"], 5)}
        if accuracy_by_rank.get(entry["rank"]) is not None:
            metrics["accuracy"] = round(accuracy_by_rank[entry["rank"]], 5)
        config.profile[entry["rank"]] = metrics
    # The training file's local path means nothing on another machine, so only its name is kept.
    train_file = Path(config.training["train_file"]).name
    config.training["train_file"] = train_file if train_file.startswith("GSM8K ") else "GSM8K " + train_file
    config.training["evaluation"] = {
        "data": "GSM8K test", "dtype": loss["dtype"],
        "answer_loss_examples": loss["examples"],
        "accuracy_examples": accuracy["examples"] if accuracy else 0,
    }
    write_config(config, target)
    print(f"packaged {target}: inference rule {rule}")
    print_profile(config.profile)
    return 0


def add_accuracy(target_dir: str, accuracy_json: str) -> int:
    config = read_config(target_dir)
    curve = matryoshka_curves(accuracy_json).get(config.inference_rule)
    if curve is None:
        raise SystemExit(f"{accuracy_json}: no Matryoshka curve under rule {config.inference_rule}, the rule "
                         f"{target_dir} is served with")
    for entry in curve["ranks"]:
        if entry["rank"] not in config.profile:
            raise SystemExit(f"{accuracy_json}: rank {entry['rank']} is not in the profile of {target_dir}")
        config.profile[entry["rank"]]["accuracy"] = round(entry["accuracy"], 5)
    config.training.setdefault("evaluation", {})["accuracy_examples"] = curve["examples"]
    write_config(config, Path(target_dir))
    print(f"added the accuracy of {accuracy_json} to {target_dir} (rule {config.inference_rule})")
    print_profile(config.profile)
    return 0


def print_profile(profile: dict[int, dict[str, float]]) -> None:
    print("rank  answer_loss  accuracy")
    for rank, metrics in sorted(profile.items()):
        accuracy_text = "-" if metrics.get("accuracy") is None else f"{metrics['accuracy']:.3f}"
        print(f"{rank:>4}  {metrics['answer_loss']:>11.4f}  {accuracy_text:>8}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--add-accuracy":
        sys.exit(add_accuracy(sys.argv[2], sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="folder of the final Matryoshka run")
    parser.add_argument("loss_json", help="`matlora eval --metrics loss` output with a curve labelled Matryoshka")
    parser.add_argument("target_dir", help="folder to write the bundled adapter to")
    parser.add_argument("--accuracy", help="`matlora eval --metrics accuracy` output, added to the profile")
    args = parser.parse_args()
    sys.exit(main(args.run_dir, args.loss_json, args.target_dir, args.accuracy))
