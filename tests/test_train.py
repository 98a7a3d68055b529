"""Training on the tiny model: training diagonals, loss, determinism, resume and option checks."""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from matlora_core import read_config
from matlora_core.cli import build_parser, main
from matlora_core.data import collate
from matlora_core.ranks import nested_diagonal, rank_scale
from matlora_core.train import TrainConfig, Trainer, train

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
    ("A train travels 60 miles in 2 hours. What is its speed?", "60 / 2 = 30\n#### 30"),
    ("Sara reads 5 pages a day for 6 days. How many pages?", "5 * 6 = 30\n#### 30"),
    ("A box holds 12 eggs. How many eggs are in 3 boxes?", "12 * 3 = 36\n#### 36"),
    ("Ben had 10 coins and lost 4. How many are left?", "10 - 4 = 6\n#### 6"),
    ("There are 8 cats and 9 dogs. How many pets?", "8 + 9 = 17\n#### 17"),
]
S = [1, 2, 4, 8]


@pytest.fixture()
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return path


def make_config(model_dir, train_file, output_dir, **overrides) -> TrainConfig:
    options = dict(
        model=str(model_dir), train_file=str(train_file), output_dir=str(output_dir), r_max=8, ranks=S,
        max_steps=4, batch_size=3, learning_rate=1e-2, warmup_steps=0, lr_schedule="constant", device="cpu",
        progress=False, log_every=1,
    )
    options.update(overrides)
    return TrainConfig(**options)


def adapter_tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def assert_same_tensors(left, right):
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@torch.no_grad()
def full_rank_loss(trainer: Trainer) -> float:
    """Return the loss over all examples at rank r_max, served with the adapter's own inference rule."""
    batch = collate(trainer.examples, trainer.tokenizer.pad_token_id)
    with trainer.model.at_rank(trainer.model.config.r_max):
        return trainer.model(**batch).loss.item()


# --- training diagonals --------------------------------------------------------------------------------


def sampled_ranks(trainer: Trainer, count: int) -> list[int]:
    """Draw ``count`` DyLoRA diagonals, check that each is s(b)·1[j < b] for some b in S, and return the b."""
    ranks = []
    for _ in range(count):
        diagonal = trainer.training_diagonal()
        width = int((diagonal != 0).sum())
        assert width in S
        expected = torch.zeros(8)
        expected[:width] = rank_scale(width, "sqrt")
        torch.testing.assert_close(diagonal, expected, rtol=0, atol=0)
        ranks.append(width)
    return ranks


def test_dylora_diagonal_is_masked_scale(tiny_model_dir, train_file, tmp_path):
    trainer = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out", adapter_kind="dylora"))
    ranks = sampled_ranks(trainer, 60)
    assert set(ranks) == set(S)


def test_dylora_sampling_is_seeded(tiny_model_dir, train_file, tmp_path):
    first = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "a", adapter_kind="dylora", seed=5))
    second = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "b", adapter_kind="dylora", seed=5))
    other = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "c", adapter_kind="dylora", seed=6))

    ranks = sampled_ranks(first, 30)
    assert sampled_ranks(second, 30) == ranks
    assert sampled_ranks(other, 30) != ranks


def test_matryoshka_diagonal_is_p(tiny_model_dir, train_file, tmp_path):
    trainer = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out"))
    torch.testing.assert_close(trainer.training_diagonal(), nested_diagonal(S, 8, "sqrt"), rtol=0, atol=0)


def test_lora_diagonal_is_constant(tiny_model_dir, train_file, tmp_path):
    trainer = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out", adapter_kind="lora"))
    assert trainer.model.config.trained_ranks == [8]
    assert torch.all(trainer.training_diagonal() == rank_scale(8, "sqrt"))


# --- the loop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["matryoshka", "lora", "dylora"])
def test_training_lowers_loss(tiny_model_dir, train_file, tmp_path, kind):
    trainer = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out", adapter_kind=kind, max_steps=15,
                                  batch_size=len(QUESTIONS)))
    before = full_rank_loss(trainer)
    losses = [trainer.train_step()[0] for _ in range(15)]

    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert full_rank_loss(trainer) < before - 0.2


def test_train_writes_adapter(tiny_model_dir, train_file, tmp_path):
    output = train(make_config(tiny_model_dir, train_file, tmp_path / "out"))

    config = read_config(output)
    assert config.trained_ranks == S
    assert config.inference_rule == "partial_sum"
    assert config.training["steps"] == 4
    assert config.training["examples"] == len(QUESTIONS)
    assert not any(path.name.startswith("checkpoint-") for path in output.iterdir())


def test_same_seed_same_adapter(tiny_model_dir, train_file, tmp_path):
    first = train(make_config(tiny_model_dir, train_file, tmp_path / "a", seed=3))
    second = train(make_config(tiny_model_dir, train_file, tmp_path / "b", seed=3))
    other = train(make_config(tiny_model_dir, train_file, tmp_path / "c", seed=4))

    assert_same_tensors(adapter_tensors(first), adapter_tensors(second))
    key = next(iter(adapter_tensors(first)))
    assert not torch.equal(adapter_tensors(first)[key], adapter_tensors(other)[key])


def test_resume_matches_uninterrupted_run(tiny_model_dir, train_file, tmp_path):
    # DyLoRA draws a rank every micro-batch, so this also checks that the rank sampler resumes where it stopped.
    # 6 examples in batches of 3 with 2 micro-batches per step: every step is one epoch, so the data order changes.
    options = dict(adapter_kind="dylora", max_steps=5, save_every=2, gradient_accumulation=2, warmup_steps=2,
                   lr_schedule="cosine")
    full = train(make_config(tiny_model_dir, train_file, tmp_path / "full", **options))
    assert sorted(p.name for p in full.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]

    resumed = train(make_config(tiny_model_dir, train_file, tmp_path / "resumed",
                                resume=str(full / "checkpoint-2"), **options))

    assert_same_tensors(adapter_tensors(full), adapter_tensors(resumed))
    assert read_config(resumed).training["steps"] == 5


def test_resume_with_other_step_count(tiny_model_dir, train_file, tmp_path):
    full = train(make_config(tiny_model_dir, train_file, tmp_path / "full", max_steps=3, save_every=1))
    with pytest.raises(ValueError, match="made for 3 steps, this run has 4; resume with the same options"):
        Trainer(make_config(tiny_model_dir, train_file, tmp_path / "resumed", resume=str(full / "checkpoint-1")))


def test_resume_without_checkpoint(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.pt: not found"):
        Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out", resume=str(tmp_path)))


def test_prompt_filling_max_length_is_dropped(tiny_model_dir, train_file, tmp_path):
    long_question = "How many? " * 40
    with train_file.open("a") as handle:
        handle.write(json.dumps({"question": long_question, "answer": "#### 1"}) + "\n")
    trainer = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out", max_length=96, batch_size=1))

    assert len(trainer.examples) == len(QUESTIONS)
    assert all(math.isfinite(trainer.train_step()[0]) for _ in range(len(QUESTIONS)))


def test_every_prompt_filling_max_length(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(ValueError, match="invalid max_length=8: every prompt in .*train.jsonl fills it"):
        Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out", max_length=8))


@pytest.mark.parametrize("option, value, message", [
    ("adapter_kind", "full", "--adapter-kind 'full' is invalid: choose matryoshka, lora or dylora"),
    ("scale_rule", "cube", "--scale-rule 'cube' is invalid: choose none, rank or sqrt"),
    ("inference_rule", "mean", "--inference-rule 'mean' is invalid: choose paper or partial_sum"),
    ("lr_schedule", "step", "--lr-schedule 'step' is invalid: choose constant, linear or cosine"),
    ("dtype", "float16", "--dtype 'float16' is invalid: choose float32 or bfloat16"),
    ("save_dtype", "int8", "--save-dtype 'int8' is invalid: choose float32, bfloat16 or float16"),
    ("r_max", 0, "--r-max 0 is invalid: it must be an integer >= 1"),
    ("max_steps", 0, "--max-steps 0 is invalid: it must be an integer >= 1"),
    ("log_every", 0, "--log-every 0 is invalid: it must be an integer >= 1"),
    ("warmup_steps", -1, "--warmup-steps -1 is invalid: it must be an integer >= 0"),
    ("save_every", -2, "--save-every -2 is invalid: it must be an integer >= 0"),
    ("train_limit", 0, "--train-limit 0 is invalid: it must be an integer >= 1"),
    ("max_grad_norm", 0.0, "--max-grad-norm 0.0 is invalid: it must be a number > 0"),
    ("weight_decay", -0.1, "--weight-decay -0.1 is invalid: it must be a number >= 0"),
    ("ranks", [64, 128], "--ranks 64,128 is invalid: at least one rank must be <= --r-max 8"),
])
def test_invalid_options(tiny_model_dir, train_file, tmp_path, option, value, message):
    with pytest.raises(ValueError) as raised:
        make_config(tiny_model_dir, train_file, tmp_path / "out", **{option: value})
    assert str(raised.value) == message


def test_max_steps_and_epochs_both_given(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(ValueError) as raised:
        make_config(tiny_model_dir, train_file, tmp_path / "out", epochs=1.0)
    assert str(raised.value) == "--max-steps 4 and --epochs 1.0 are both given: give exactly one of them"


def test_max_steps_and_epochs_both_missing(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(ValueError) as raised:
        make_config(tiny_model_dir, train_file, tmp_path / "out", max_steps=None)
    assert str(raised.value) == "missing run length: give --max-steps or --epochs (exactly one)"


def test_epochs_set_step_count(tiny_model_dir, train_file, tmp_path):
    trainer = Trainer(make_config(tiny_model_dir, train_file, tmp_path / "out", max_steps=None, epochs=2.0,
                                  gradient_accumulation=2))
    assert trainer.total_steps == 2      # 2 epochs of 2 batches, 2 batches per step


def test_cli_train(tiny_model_dir, train_file, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
                 "--output-dir", str(tmp_path / "out"), "--r-max", "4", "--ranks", "1,2,4,16", "--max-steps", "2",
                 "--batch-size", "3", "--device", "cpu", "--no-progress", "--scale-rule", "rank"])
    assert code == 0
    assert f"adapter written to {tmp_path / 'out'}" in capsys.readouterr().out
    config = read_config(tmp_path / "out")
    assert config.trained_ranks == [1, 2, 4]
    assert config.scale_rule == "rank"


def cli_train(model_dir, train_file, output_dir, *extra):
    return main(["train", "--model", str(model_dir), "--train-file", str(train_file), "--output-dir", str(output_dir),
                 "--r-max", "4", "--ranks", "1,2,4", "--max-steps", "1", "--batch-size", "3", "--device", "cpu",
                 "--no-progress", *extra])


def test_cli_train_keeps_existing_adapter(tiny_model_dir, train_file, tmp_path, caplog):
    output = tmp_path / "out"
    assert cli_train(tiny_model_dir, train_file, output, "--seed", "1") == 0
    before = adapter_tensors(output)

    with caplog.at_level(logging.ERROR):
        code = cli_train(tiny_model_dir, train_file, output, "--seed", "2")
    assert code == 2
    assert f"--output-dir {output} already contains adapter_config.json: choose another folder or pass " \
           "--overwrite to replace the adapter" in caplog.text
    assert_same_tensors(adapter_tensors(output), before)


def test_cli_train_overwrite_replaces_adapter(tiny_model_dir, train_file, tmp_path):
    output = tmp_path / "out"
    assert cli_train(tiny_model_dir, train_file, output, "--seed", "1") == 0
    before = adapter_tensors(output)

    assert cli_train(tiny_model_dir, train_file, output, "--seed", "2", "--overwrite") == 0
    key = next(iter(before))
    assert not torch.equal(adapter_tensors(output)[key], before[key])
    assert "overwrite" not in read_config(output).training


def test_existing_adapter_checked_before_model_loads(train_file, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="already contains adapter_model.safetensors"):
        Trainer(make_config(tmp_path / "no-such-model", train_file, output))


def test_resume_into_finished_run_folder(tiny_model_dir, train_file, tmp_path):
    # --resume continues a run in its own folder, so an adapter already there is replaced without --overwrite.
    full = train(make_config(tiny_model_dir, train_file, tmp_path / "full", save_every=2))
    resumed = train(make_config(tiny_model_dir, train_file, full, resume=str(full / "checkpoint-2")))
    assert read_config(resumed).training["steps"] == 4


def test_cli_train_output_dir_is_file(tiny_model_dir, train_file, tmp_path, caplog):
    target = tmp_path / "out.txt"
    target.write_text("notes")
    with caplog.at_level(logging.ERROR):
        code = cli_train(tiny_model_dir, train_file, target)
    assert code == 2
    assert f"--output-dir {target} is an existing file: give a folder path" in caplog.text
    assert target.read_text() == "notes"


def test_cli_train_invalid_choice_message(tiny_model_dir, train_file, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = cli_train(tiny_model_dir, train_file, tmp_path / "out", "--adapter-kind", "x")
    assert code == 2
    assert "--adapter-kind 'x' is invalid: choose matryoshka, lora or dylora" in caplog.text
    assert "(" not in caplog.records[-1].getMessage()


def test_train_help_lists_choices_plainly(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines at the terminal width
    assert "training diagonal: matryoshka, lora or dylora" in help_text
    assert "decay after warm-up: constant, linear or cosine" in help_text
    assert "('" not in help_text


@pytest.mark.parametrize("level", ["verbose", "trace", "5"])
def test_invalid_log_level(tmp_path, capsys, level):
    with pytest.raises(SystemExit) as raised:
        main(["--log-level", level, "train", "--model", "m", "--train-file", "f", "--output-dir", str(tmp_path)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert f"argument --log-level: invalid log level {level!r}: choose DEBUG, INFO, WARNING or ERROR" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("level", ["debug", "Warning", "ERROR"])
def test_log_level_any_case(level):
    args = build_parser().parse_args(["--log-level", level, "export", "--adapter", "a", "--rank", "1",
                                      "--output", "o"])
    assert args.log_level == level.upper()
