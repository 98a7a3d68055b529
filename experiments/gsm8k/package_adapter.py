"""Make the bundled adapter from the final Matryoshka run and its evaluation.

The adapter is served with the inference rule whose loss curve has the lower log2 AURAC on the test questions,
and that rule's per-rank results become its profile (the quality the server reports in /v1/ranks).

    python experiments/gsm8k/package_adapter.py RUN_DIR EVAL_JSON TARGET_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from matlora_core import read_config
from matlora_core.adapter import write_config
from matlora_core.config import CONFIG_NAME, WEIGHTS_NAME


def main(run_dir: str, eval_json: str, target_dir: str) -> int:
    results = json.loads(Path(eval_json).read_text())
    curves = [c for c in results["curves"] if c["label"] == "Matryoshka"]
    if not curves:
        raise SystemExit(f"{eval_json}: no curve labelled Matryoshka")
    best = min(curves, key=lambda c: c["aurac"]["answer_loss"]["log2"])

    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copy(Path(run_dir) / name, target / name)

    config = read_config(target)
    config.inference_rule = best["inference_rule"]
    config.quality_metric = "accuracy"
    config.profile = {r["rank"]: {"answer_loss": round(r["answer_loss"], 5), "accuracy": round(r["accuracy"], 5)}
                      for r in best["ranks"]}
    config.training["evaluation"] = {"data": "GSM8K test", "examples": results["examples"],
                                     "dtype": results["dtype"], "metrics": "answer_loss, accuracy"}
    write_config(config, target)
    print(f"packaged {target}: inference rule {config.inference_rule}, profile ranks {sorted(config.profile)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    sys.exit(main(*sys.argv[1:]))
