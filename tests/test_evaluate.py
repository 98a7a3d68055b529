"""Per-rank evaluation: AURAC against hand-computed values, answer-token loss, generation and `matlora eval`."""

import json
import logging
import re
import shutil

import pytest
import torch

from matlora_core import read_config
from matlora_core.cli import main
from matlora_core.data import Example, collate, tokenize_example
from matlora_core.evaluate import (CurveResult, RankResult, accuracy_at_ranks, answer_loss, aurac, evaluate_curve,
                                   greedy_accuracy)
from matlora_core.report import draw_curves, format_table

from .conftest import randomize_adapter

EXAMPLES = [
    Example("Question: Tom has 3 apples and buys 4 more. How many?\nAnswer: ", "3 + 4 = 7\n#### 7", "7"),
    Example("Question: A train travels 60 miles in 2 hours. Speed?\nAnswer: ", "60 / 2 = 30\n#### 30", "30"),
    Example("Question: What is 2 + 2?\nAnswer: ", "2 + 2 = 4\n#### 4", "4"),
]


# --- AURAC ---------------------------------------------------------------------------------------------


def test_aurac_linear_hand_value():
    # Trapezoids on x = 1, 2, 4: (1 + 2) / 2 * 1 + (2 + 4) / 2 * 2 = 7.5, over an axis of length 3.
    assert aurac([(1, 1.0), (2, 2.0), (4, 4.0)], log2_axis=False) == pytest.approx(2.5)


def test_aurac_log2_hand_value():
    # On x = log2(rank) = 0, 1, 2: (1 + 2) / 2 + (2 + 4) / 2 = 4.5, over an axis of length 2.
    assert aurac([(1, 1.0), (2, 2.0), (4, 4.0)], log2_axis=True) == pytest.approx(2.25)


def test_aurac_uneven_log2_spacing():
    # x = 1, 3 (ranks 2 and 8): one trapezoid (0.5 + 0.9) / 2 * 2 = 1.4, over length 2.
    assert aurac([(2, 0.5), (8, 0.9)], log2_axis=True) == pytest.approx(0.7)
    # Linear x = 2, 8: (0.5 + 0.9) / 2 * 6 / 6.
    assert aurac([(2, 0.5), (8, 0.9)], log2_axis=False) == pytest.approx(0.7)


def test_aurac_excludes_rank_zero():
    points = [(0, 100.0), (1, 1.0), (2, 2.0), (4, 4.0)]
    assert aurac(points, log2_axis=False) == pytest.approx(2.5)
    assert aurac(points, log2_axis=True) == pytest.approx(2.25)


def test_aurac_sorts_points():
    assert aurac([(4, 4.0), (1, 1.0), (2, 2.0)], log2_axis=False) == pytest.approx(2.5)


def test_aurac_single_point():
    assert aurac([(0, 3.0), (8, 0.3)], log2_axis=False) == 0.3
    assert aurac([(8, 0.3)], log2_axis=True) == 0.3


def test_aurac_no_point():
    assert aurac([], log2_axis=False) is None
    assert aurac([(0, 3.0)], log2_axis=True) is None


def test_curve_aurac_skips_missing_values():
    curve = CurveResult(label="a", adapter="a", inference_rule="paper", ranks=[
        RankResult(rank=0, answer_loss=9.0), RankResult(rank=1, answer_loss=1.0, accuracy=None),
        RankResult(rank=4, answer_loss=4.0, accuracy=0.5),
    ])
    assert curve.aurac("answer_loss") == {"linear": pytest.approx(2.5), "log2": pytest.approx(2.5)}
    assert curve.aurac("accuracy") == {"linear": 0.5, "log2": 0.5}


# --- loss and generation -------------------------------------------------------------------------------


@torch.no_grad()
def test_answer_loss_equals_mean_answer_nll(tiny_matryoshka, tiny_tokenizer):
    batch = collate([tokenize_example(e, tiny_tokenizer, 512) for e in EXAMPLES], tiny_tokenizer.pad_token_id)
    with tiny_matryoshka.at_rank(4):
        expected = tiny_matryoshka(**batch).loss.item()   # mean NLL over every answer token of the batch

    loss, tokens = answer_loss(tiny_matryoshka, tiny_tokenizer, EXAMPLES, rank=4, batch_size=2)

    assert loss == pytest.approx(expected, rel=1e-5)
    assert tokens == int((batch["labels"] != -100).sum())


@torch.no_grad()
def test_answer_loss_rank_zero_is_base_model(tiny_matryoshka, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = collate([tokenize_example(e, tiny_tokenizer, 512) for e in EXAMPLES], tiny_tokenizer.pad_token_id)

    loss, _ = answer_loss(tiny_matryoshka, tiny_tokenizer, EXAMPLES, rank=0)

    assert loss == pytest.approx(base(**batch).loss.item(), rel=1e-5)
    assert loss != pytest.approx(answer_loss(tiny_matryoshka, tiny_tokenizer, EXAMPLES, rank=16)[0], rel=1e-3)


@torch.no_grad()
def test_greedy_rank_zero_is_base_generation(tiny_matryoshka, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    accuracy, texts = greedy_accuracy(tiny_matryoshka, tiny_tokenizer, EXAMPLES, rank=0, max_new_tokens=5)

    for example, text in zip(EXAMPLES, texts):
        encoded = tiny_tokenizer(example.prompt, return_tensors="pt")
        output = base.generate(**encoded, max_new_tokens=5, do_sample=False,
                               pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
        assert text == tiny_tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert 0.0 <= accuracy <= 1.0
    assert tiny_tokenizer.padding_side == "right"


@pytest.mark.parametrize("rule", ["paper", "partial_sum"])
def test_accuracy_at_ranks_matches_generate(tiny_matryoshka, tiny_tokenizer, rule):
    randomize_adapter(tiny_matryoshka, scale=0.5)   # large enough that the ranks generate different text
    # One continuous batch of every (question, rank) pair, 2 rows at a time so rows leave and join mid-run.
    batched = accuracy_at_ranks(tiny_matryoshka, tiny_tokenizer, EXAMPLES, [0, 2, 16], rule, batch_size=2,
                                max_new_tokens=6)

    assert list(batched) == [0, 2, 16]
    for rank, (accuracy, texts, tokens) in batched.items():
        expected_accuracy, expected_texts = greedy_accuracy(tiny_matryoshka, tiny_tokenizer, EXAMPLES, rank, rule,
                                                            batch_size=1, max_new_tokens=6)
        assert texts == expected_texts
        assert accuracy == expected_accuracy
        assert len(EXAMPLES) <= tokens <= 6 * len(EXAMPLES)
    assert batched[0][1] != batched[16][1]


def test_accuracy_rank_above_r_max_rejected(tiny_matryoshka, tiny_tokenizer):
    with pytest.raises(ValueError, match="rank 17 is outside 0..r_max=16"):
        accuracy_at_ranks(tiny_matryoshka, tiny_tokenizer, EXAMPLES, [4, 17])


def test_evaluate_curve_reuses_rank_zero(tiny_matryoshka, tiny_tokenizer):
    base_results = {}
    first = evaluate_curve(tiny_matryoshka, tiny_tokenizer, EXAMPLES, [0, 4], "a", "a", "paper", metrics=["loss"],
                           base_results=base_results)
    second = evaluate_curve(tiny_matryoshka, tiny_tokenizer, EXAMPLES, [0, 4], "a", "a", "partial_sum",
                            metrics=["loss"], base_results=base_results)

    assert second.ranks[0] is first.ranks[0]
    assert [r.rank for r in second.ranks] == [0, 4]
    assert first.ranks[1].accuracy is None
    assert first.ranks[1].answer_loss != second.ranks[1].answer_loss


# --- matlora eval --------------------------------------------------------------------------------------


@pytest.fixture()
def eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    records = [{"question": e.prompt.removeprefix("Question: ").removesuffix("\nAnswer: "), "answer": e.completion}
               for e in EXAMPLES]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_cli_eval_writes_outputs_and_profile(tiny_model_dir, tiny_adapter_dir, eval_file, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    code = main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(eval_file),
                 "--ranks", "0,4,16", "--rule", "paper,partial_sum", "--max-new-tokens", "4", "--device", "cpu",
                 "--output", str(tmp_path / "out" / "results.json"), "--plot", str(tmp_path / "out" / "curves.png"),
                 "--write-profile"])
    assert code == 0

    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["adapter", "rule", "rank", "loss", "accuracy"]
    rows = [line.split() for line in table.splitlines()]
    rank_rows = [(row[1], int(row[2])) for row in rows if len(row) == 5 and row[2].isdigit()]
    assert rank_rows == [(rule, rank) for rule in ("paper", "partial_sum") for rank in (0, 4, 16)]
    aurac_rows = [(row[1], row[2]) for row in rows if len(row) == 5 and row[2] in ("answer_loss", "accuracy")]
    assert aurac_rows == [(rule, metric) for rule in ("paper", "partial_sum") for metric in ("answer_loss", "accuracy")]

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["examples"] == 3
    assert [c["inference_rule"] for c in results["curves"]] == ["paper", "partial_sum"]
    assert [r["rank"] for r in results["curves"][0]["ranks"]] == [0, 4, 16]
    assert results["curves"][0]["aurac"]["answer_loss"]["linear"] is not None
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = read_config(adapter)
    paper = results["curves"][0]["ranks"]
    assert sorted(config.profile) == [0, 4, 16]
    for rank, result in zip([0, 4, 16], paper):
        assert config.profile[rank]["answer_loss"] == pytest.approx(result["answer_loss"], abs=1e-5)
        assert config.profile[rank]["accuracy"] == pytest.approx(result["accuracy"], abs=1e-5)
    assert config.quality_metric == "accuracy"
    assert config.training["evaluation"]["examples"] == 3


def test_cli_eval_invalid_rank(tiny_model_dir, tiny_adapter_dir, eval_file, caplog):
    code = main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir), "--data", str(eval_file),
                 "--ranks", "0,32", "--metrics", "loss", "--device", "cpu"])
    assert code == 2
    assert "--ranks entry 32 is invalid: " in caplog.text
    assert "has r_max=16, so choose ranks in 0..16" in caplog.text


def test_cli_eval_profile_needs_own_rule(tiny_adapter_dir, eval_file, tmp_path, caplog):
    # The model name does not exist: the rule check has to fail before any model loads.
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    code = main(["eval", "--model", str(tmp_path / "no-model"), "--adapter", str(adapter), "--data", str(eval_file),
                 "--ranks", "4", "--metrics", "loss", "--rule", "partial_sum", "--device", "cpu", "--write-profile"])
    assert code == 2
    assert "inference rule 'paper', which is not evaluated; add it to --rule" in caplog.text


def test_cli_eval_uses_each_adapter_prompt_format(tiny_model_dir, tiny_adapter_dir, eval_file, tmp_path):
    plain = tmp_path / "plain"
    terse = tmp_path / "terse"
    shutil.copytree(tiny_adapter_dir, plain)
    shutil.copytree(tiny_adapter_dir, terse)
    config_path = terse / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["matryoshka"]["prompt_format"] = "Q: {question}\nA: "
    config_path.write_text(json.dumps(data))

    code = main(["eval", "--model", str(tiny_model_dir), "--adapter", str(plain), "--adapter", str(terse),
                 "--data", str(eval_file), "--ranks", "0", "--metrics", "loss", "--device", "cpu",
                 "--output", str(tmp_path / "results.json")])
    assert code == 0

    curves = json.loads((tmp_path / "results.json").read_text())["curves"]
    assert curves[0]["ranks"][0]["answer_loss"] != curves[1]["ranks"][0]["answer_loss"]


def eval_args(model_dir, adapter, eval_file, *extra):
    return ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(eval_file),
            "--device", "cpu", "--max-new-tokens", "2", *extra]


def test_cli_eval_profile_is_replaced(tiny_model_dir, tiny_adapter_dir, eval_file, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    assert main(eval_args(tiny_model_dir, adapter, eval_file, "--ranks", "0,4,16", "--write-profile")) == 0
    assert read_config(adapter).quality_metric == "accuracy"

    # A later loss-only run on fewer examples and ranks: nothing of the first run may remain.
    assert main(eval_args(tiny_model_dir, adapter, eval_file, "--ranks", "4", "--metrics", "loss", "--limit", "2",
                          "--write-profile")) == 0

    config = read_config(adapter)
    assert list(config.profile) == [4]
    assert list(config.profile[4]) == ["answer_loss"]
    assert config.quality_metric == "answer_loss"
    assert config.training["evaluation"]["examples"] == 2
    assert config.training["evaluation"]["metrics"] == ["answer_loss"]
    assert config.training["evaluation"]["inference_rule"] == "paper"


def test_cli_eval_profile_accuracy_only(tiny_model_dir, tiny_adapter_dir, eval_file, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    assert main(eval_args(tiny_model_dir, adapter, eval_file, "--ranks", "4", "--metrics", "accuracy",
                          "--write-profile")) == 0
    config = read_config(adapter)
    assert list(config.profile[4]) == ["accuracy"]
    assert config.quality_metric == "accuracy"


def test_cli_eval_profile_chosen_quality_metric(tiny_model_dir, tiny_adapter_dir, eval_file, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    assert main(eval_args(tiny_model_dir, adapter, eval_file, "--ranks", "4", "--write-profile",
                          "--quality-metric", "answer_loss")) == 0
    config = read_config(adapter)
    assert sorted(config.profile[4]) == ["accuracy", "answer_loss"]
    assert config.quality_metric == "answer_loss"


def test_cli_eval_records_real_example_count(tiny_model_dir, tiny_adapter_dir, eval_file, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    assert main(eval_args(tiny_model_dir, adapter, eval_file, "--ranks", "4", "--metrics", "loss", "--limit", "10",
                          "--write-profile", "--output", str(tmp_path / "results.json"))) == 0
    assert read_config(adapter).training["evaluation"]["examples"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["examples"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--metrics", "loss", "--quality-metric", "accuracy", "--write-profile"],
     "--quality-metric accuracy is not measured by --metrics loss: add accuracy to --metrics"),
    (["--metrics", "accuracy", "--quality-metric", "answer_loss", "--write-profile"],
     "--quality-metric answer_loss is not measured by --metrics accuracy: add loss to --metrics"),
    (["--quality-metric", "bleu", "--write-profile"],
     "--quality-metric 'bleu' is invalid: choose answer_loss or accuracy"),
    (["--quality-metric", "accuracy"], "--quality-metric chooses the quality figure of the profile, so it needs "
                                       "--write-profile"),
    (["--metrics", "perplexity"], "--metrics entry 'perplexity' is invalid: choose loss, answer_loss or accuracy"),
    (["--metrics", ","], "--metrics is empty: give loss, accuracy or both"),
    (["--rule", "mean"], "--rule entry 'mean' is invalid: choose paper or partial_sum"),
    (["--dtype", "float16"], "--dtype float16 needs a CUDA device, but the device is cpu: use float32 or bfloat16"),
])
def test_cli_eval_rejects_before_model_loads(tiny_adapter_dir, eval_file, tmp_path, caplog, extra, message):
    # The model folder does not exist, so a check that ran after loading would report the model instead.
    code = main(eval_args(tmp_path / "no-model", tiny_adapter_dir, eval_file, *extra))
    assert code == 2
    assert message in caplog.text
    assert "no-model" not in caplog.text


@pytest.mark.parametrize("option, value, message", [
    ("--limit", "0", "invalid value 0: expected an integer >= 1"),
    ("--limit", "-3", "invalid value -3: expected an integer >= 1"),
    ("--batch-size", "0", "invalid value 0: expected an integer >= 1"),
    ("--max-new-tokens", "0", "invalid value 0: expected an integer >= 1"),
    ("--max-new-tokens", "many", "invalid value 'many': expected an integer >= 1"),
    ("--dtype", "int8", "invalid choice: 'int8'"),
])
def test_cli_eval_invalid_numbers(tiny_adapter_dir, eval_file, tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as raised:
        main(eval_args(tmp_path / "no-model", tiny_adapter_dir, eval_file, option, value))
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}: {message}" in error
    assert "Traceback" not in error


def test_eval_help_lists_dtypes(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "float32, bfloat16 or float16; float16 needs a CUDA device" in help_text
    assert "loss (also accepted as answer_loss), accuracy or both" in help_text


def test_cli_eval_metric_named_answer_loss(tiny_model_dir, tiny_adapter_dir, eval_file, tmp_path):
    assert main(eval_args(tiny_model_dir, tiny_adapter_dir, eval_file, "--ranks", "4", "--metrics", "answer_loss",
                          "--output", str(tmp_path / "results.json"))) == 0
    result = json.loads((tmp_path / "results.json").read_text())["curves"][0]["ranks"][0]
    assert result["answer_loss"] is not None
    assert result["accuracy"] is None


def test_cli_eval_log_names_rule(tiny_model_dir, tiny_adapter_dir, eval_file, caplog):
    with caplog.at_level(logging.INFO, logger="matlora_core.evaluate"):
        assert main(eval_args(tiny_model_dir, tiny_adapter_dir, eval_file, "--ranks", "4", "--metrics", "loss",
                              "--rule", "paper,partial_sum", "--label", "tiny")) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "matlora_core.evaluate"]
    assert [line.split(":")[0] for line in lines] == ["tiny, rule paper, rank 4", "tiny, rule partial_sum, rank 4"]


# --- report --------------------------------------------------------------------------------------------


def column_ends(line: str) -> list[int]:
    return [match.end() for match in re.finditer(r"\S+", line)]


def test_table_columns_line_up():
    curves = [
        CurveResult(label="a-label-longer-than-thirty-two-characters", adapter="a", inference_rule="partial_sum",
                    ranks=[RankResult(rank=0, answer_loss=3.25), RankResult(rank=4, answer_loss=2.5, accuracy=0.5),
                           RankResult(rank=16, answer_loss=12.125, accuracy=1.0)]),
        CurveResult(label="b", adapter="b", inference_rule="paper",
                    ranks=[RankResult(rank=4, answer_loss=2.0, accuracy=0.25)]),
    ]
    ranks_part, aurac_part = format_table(curves).split("\n\n")

    # Numbers are right-aligned, so each value ends where its header ends.
    header, *rows = ranks_part.splitlines()
    for row in rows:
        assert column_ends(row)[2:] == column_ends(header)[2:], row
        assert row.index(row.split()[1]) == header.index("rule"), row
    header, *rows = aurac_part.splitlines()
    assert header.split()[:3] == ["adapter", "rule", "metric"]
    assert len(rows) == 4
    for row in rows:
        values = column_ends(row)
        assert values[-2:] == [header.index("linear") + len("linear"), len(header)], row
        assert row.index(row.split()[2]) == header.index("metric"), row


def test_accuracy_axis_spans_zero_to_one():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    curve = CurveResult(label="a", adapter="a", inference_rule="paper", ranks=[
        RankResult(rank=r, answer_loss=2.0, accuracy=0.0) for r in (0, 1, 2, 4)])
    figure = draw_curves([curve])
    loss_axis, accuracy_axis = figure.axes
    figure.canvas.draw()

    assert accuracy_axis.get_ylim() == pytest.approx((-0.02, 1.02))
    low, high = loss_axis.get_ylim()
    assert low <= 2.0 - 0.05
    assert high >= 2.0 + 0.05
    assert loss_axis.yaxis.get_offset_text().get_text() == ""
    plt.close(figure)
