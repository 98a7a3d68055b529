"""JSON Lines data: loss masking of prompt tokens, padding, answer extraction and every format error."""

import json

import pytest
import torch

from matlora_core.data import (
    IGNORE_INDEX,
    DataFormatError,
    Example,
    answers_match,
    collate,
    extract_answer,
    load_examples,
    tokenize_example,
)

PROMPT_FORMAT = "Question: {question}\nAnswer: "
GOOD = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"}


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_labels_mask_exactly_the_prompt(tiny_tokenizer):
    example = Example(prompt="Question: What is 60 / 2?\nAnswer: ", completion="60 / 2 = 30\n#### 30")
    prompt_ids = tiny_tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tiny_tokenizer(example.completion, add_special_tokens=False)["input_ids"]

    tokenized = tokenize_example(example, tiny_tokenizer, max_length=512)

    assert tokenized.input_ids == prompt_ids + completion_ids + [tiny_tokenizer.eos_token_id]
    assert tokenized.labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tokenized.labels[len(prompt_ids):] == completion_ids + [tiny_tokenizer.eos_token_id]
    assert IGNORE_INDEX not in tokenized.labels[len(prompt_ids):]


def test_completion_ends_with_eos(tiny_tokenizer):
    tokenized = tokenize_example(Example(prompt="Q ", completion="A"), tiny_tokenizer, max_length=512)
    assert tokenized.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tokenized.labels[-1] == tiny_tokenizer.eos_token_id


def test_truncation_cuts_from_the_end(tiny_tokenizer):
    example = Example(prompt="Question: What is 60 / 2?\nAnswer: ", completion="60 / 2 = 30\n#### 30")
    full = tokenize_example(example, tiny_tokenizer, max_length=512)
    cut = tokenize_example(example, tiny_tokenizer, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3]
    assert cut.labels == full.labels[:-3]

    prompt_only = tokenize_example(example, tiny_tokenizer, max_length=4)
    assert prompt_only.labels == [IGNORE_INDEX] * 4


def test_collate_pads_right(tiny_tokenizer):
    short = tokenize_example(Example(prompt="Q ", completion="7"), tiny_tokenizer, 512)
    long = tokenize_example(Example(prompt="Question: how many? ", completion="3 + 4 = 7"), tiny_tokenizer, 512)
    batch = collate([short, long], pad_token_id=tiny_tokenizer.pad_token_id)

    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert torch.all(batch["input_ids"][0, n:] == tiny_tokenizer.pad_token_id)
    assert torch.all(batch["labels"][0, n:] == IGNORE_INDEX)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["labels"][1].tolist() == long.labels


def test_load_question_answer(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, "", {"prompt": "Say hi: ", "completion": "hi"}])
    examples = load_examples(path, PROMPT_FORMAT)

    assert examples[0].prompt == f"Question: {GOOD['question']}\nAnswer: "
    assert examples[0].completion == GOOD["answer"]
    assert examples[0].reference == "7"
    assert examples[1] == Example(prompt="Say hi: ", completion="hi", reference=None)


def test_load_limit(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD] * 5)
    assert len(load_examples(path, PROMPT_FORMAT, limit=2)) == 2


@pytest.mark.parametrize("limit", [0, -1])
def test_load_limit_below_one(tmp_path, limit):
    path = write_lines(tmp_path / "data.jsonl", [GOOD] * 3)
    with pytest.raises(ValueError, match=f"invalid limit {limit}: it must be an integer >= 1"):
        load_examples(path, PROMPT_FORMAT, limit=limit)


def test_load_limit_above_file_length(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD] * 3)
    assert len(load_examples(path, PROMPT_FORMAT, limit=10)) == 3


def test_complete_pair_ignores_other_pair_key(tmp_path):
    # A prompt/completion line with a stray "question" key: only prompt/completion is complete, so it is used.
    line = {"prompt": "Say hi: ", "completion": "hi", "question": "unused"}
    examples = load_examples(write_lines(tmp_path / "data.jsonl", [line]), PROMPT_FORMAT)
    assert examples == [Example(prompt="Say hi: ", completion="hi", reference=None)]


def test_stray_answer_key_is_ignored(tmp_path):
    line = {"prompt": "Say hi: ", "completion": "hi", "answer": "#### 3"}
    examples = load_examples(write_lines(tmp_path / "data.jsonl", [line]), PROMPT_FORMAT)
    assert examples[0].completion == "hi"
    assert examples[0].reference is None


def test_question_answer_wins_when_both_complete(tmp_path):
    line = {**GOOD, "prompt": "Say hi: ", "completion": "hi"}
    examples = load_examples(write_lines(tmp_path / "data.jsonl", [line]), PROMPT_FORMAT)
    assert examples[0].prompt == f"Question: {GOOD['question']}\nAnswer: "
    assert examples[0].completion == GOOD["answer"]


def test_load_accepts_byte_order_mark(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_examples(path, PROMPT_FORMAT)[0].reference == "7"


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "q", ', "invalid JSON: Expecting property name enclosed in double quotes at column 19"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ({"question": "How many?"}, "missing key 'answer'"),
    ({"prompt": "Say: "}, "missing key 'completion'"),
    ({"question": "How many?", "answer": 7}, "key 'answer' must be a string, got int"),
    ({"prompt": None, "completion": "x"}, "key 'prompt' must be a string, got NoneType"),
    ({"question": "  ", "answer": "#### 7"}, "key 'question' is empty"),
    ({"prompt": "Say: ", "completion": ""}, "key 'completion' is empty"),
    ({"input": "a", "output": "b"}, r"expected keys question/answer or prompt/completion, got \['input', 'output'\]"),
    ({"question": "How many?", "completion": "7"},
     "missing key 'answer' or key 'prompt': a line needs both keys of question/answer or of prompt/completion"),
    ({"answer": "#### 7", "prompt": "Say: "}, "missing key 'question' or key 'completion'"),
])
def test_format_errors_name_file_and_line(tmp_path, bad_line, message):
    # The blank line counts: the bad line is line 4 of the file.
    path = write_lines(tmp_path / "data.jsonl", [GOOD, GOOD, "", bad_line, GOOD])
    with pytest.raises(DataFormatError, match=f"data.jsonl:4: {message}"):
        load_examples(path, PROMPT_FORMAT)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "\xff"}\n')
    with pytest.raises(DataFormatError, match="data.jsonl:2: invalid UTF-8 at byte 14"):
        load_examples(path, PROMPT_FORMAT)


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="missing.jsonl: file not found"):
        load_examples(tmp_path / "missing.jsonl", PROMPT_FORMAT)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match="empty.jsonl: no examples found"):
        load_examples(path, PROMPT_FORMAT)


@pytest.mark.parametrize("text, answer", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### -2.5", "-2.5"),
    ("first #### 3 then #### 4", "4"),
    ("no marker 7", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answers_match():
    assert answers_match("7", "7.0")
    assert answers_match("1234", "1234")
    assert not answers_match("7", "8")
    assert not answers_match(None, "7")
    assert not answers_match("7", None)
