"""matlora-bench: the workload and statistics pieces, short runs against a live tiny server, and the sweep."""

from __future__ import annotations

import csv
import json

import pytest

from matlora_client.bench import main
from matlora_client.bench_load import StopRule
from matlora_client.bench_report import percentile
from matlora_client.bench_workload import (Workload, builtin_prompts, check_prompt_format, load_prompts,
                                           parse_rank_mix)

from .live_server import live_server, tiny_settings
from .test_client import scripted, stub_server

OFFERED = [0, 1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def server():
    with live_server(tiny_settings(profile_steps=1, profile_batch_sizes=[1])) as running:
        yield running


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- pieces ----------------------------------------------------------------------------------------------------

def test_rank_mix_is_normalised():
    assert parse_rank_mix("4:0.5,16:0.3,64:0.2") == pytest.approx({4: 0.5, 16: 0.3, 64: 0.2})
    assert parse_rank_mix("0:1, 8:3") == {0: 0.25, 8: 0.75}


@pytest.mark.parametrize("spec, message", [
    ("4", "RANK:WEIGHT"),
    ("a:1", "RANK:WEIGHT"),
    ("-4:1", "0 or more"),
    ("4:1,4:2", "listed twice"),
    ("4:0,8:0", "sum to 0"),
])
def test_rank_mix_rejects_invalid_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_rank_mix(spec)


@pytest.mark.parametrize("prompt_format, message", [
    ("Q: {q}", "unknown placeholder(s) {q}; the only placeholder is {question}"),
    ("Q: {}", "unknown placeholder(s) {}"),
    ("Q: {question", "expected '}' before end of string"),
    ("Q: none", "has no {question} placeholder"),
    ("{question:d}", "Unknown format code 'd'"),
])
def test_prompt_format_is_checked(prompt_format, message):
    with pytest.raises(ValueError) as raised:
        check_prompt_format(prompt_format)
    assert message in str(raised.value)


def test_prompt_format_with_literal_braces():
    check_prompt_format("{{json}} Q: {question!r}")
    assert builtin_prompts("{{json}} {question}")[0].startswith("{json} A baker")


@pytest.mark.parametrize("arguments, message", [
    (["--rank-mix", "4:x"], "--rank-mix: invalid entry '4:x'"),
    (["--rate", "0"], "--rate must be above 0, got 0.0"),
    (["--prompt-format", "Q: {q}"], "unknown placeholder(s) {q}"),
    (["--prompts", "no-such-file.jsonl"], "--prompts no-such-file.jsonl: file not found"),
    (["--timeout", "0"], "argument --timeout: must be a number of seconds above 0"),
    (["--url", "localhost:8000"], "argument --url: the URL must start with http:// or https://"),
    (["--openai-base-url", "http://"], "argument --openai-base-url: the URL 'http://' has no host"),
])
def test_invalid_arguments_exit_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main([*arguments, "--no-progress"])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_workload_draws_are_seeded():
    mix = {4: 0.5, 16: 0.5}
    first_run, second_run = Workload(["p"], mix, seed=3), Workload(["p"], mix, seed=3)
    first = [first_run.item(i).rank for i in range(20)]
    again = [second_run.item(i).rank for i in range(20)]
    assert first == again
    assert set(first) == {4, 16}


def test_prompts_from_question_and_prompt_fields(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"question": "What is 2+2?", "answer": "4\\n#### 4"}\n\n{"prompt": "Say hi"}\n')
    assert load_prompts(path) == ["Question: What is 2+2?\nAnswer: ", "Say hi"]
    path.write_text('{"question": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected an object"):
        load_prompts(path)
    assert len(builtin_prompts()) == 8


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None


def test_stop_rule_needs_a_limit():
    with pytest.raises(ValueError, match="--duration or --num-requests"):
        StopRule()
    assert not StopRule(num_requests=2).admits(2, 0.0)
    assert not StopRule(duration_s=1.0).admits(0, 1.5)


# --- runs against the live server ------------------------------------------------------------------------------

def test_closed_loop_writes_csv_and_json(server, tmp_path, capsys):
    prefix = tmp_path / "closed"
    status = main(["--url", server.url, "--num-requests", "6", "--concurrency", "2", "--rank-mix", "4:1,16:1",
                   "--max-tokens", "6", "--ignore-eos", "--output-prefix", str(prefix), "--no-progress"])
    assert status == 0
    rows = read_csv(f"{prefix}.csv")
    assert [row["rank"] for row in rows][-1] == "all"
    assert {row["rank"] for row in rows[:-1]} <= {"4", "16"}
    assert rows[-1]["requests"] == "6"
    assert rows[-1]["errors"] == "0"
    assert float(rows[-1]["output_tokens_per_s"]) > 0
    report = json.loads((tmp_path / "closed.json").read_text())
    assert len(report["requests"]) == 6
    assert all(record["ttft_s"] > 0 and record["e2e_s"] >= record["ttft_s"] for record in report["requests"])
    assert [record["output_tokens"] for record in report["requests"]] == [6] * 6
    assert report["summary"][-1]["tpot_ms_p50"] > 0
    assert "TTFT p50" in capsys.readouterr().out


def test_open_loop_through_openai_route(server, tmp_path):
    prompts = tmp_path / "gsm8k.jsonl"
    prompts.write_text('{"question": "Tom has 3 apples and buys 4. How many?", "answer": "#### 7"}\n')
    prefix = tmp_path / "open"
    status = main(["--openai-base-url", f"{server.url}/v1", "--rate", "40", "--duration", "0.2",
                   "--num-requests", "4", "--rank-mix", "0:1", "--prompts", str(prompts), "--max-tokens", "4",
                   "--ignore-eos", "--output-prefix", str(prefix), "--no-progress"])
    assert status == 0
    report = json.loads((tmp_path / "open.json").read_text())
    records = report["requests"]
    assert 1 <= len(records) <= 4
    assert all(record["ok"] for record in records)
    assert {record["rank"] for record in records} == {0}  # the server's default rank is 16
    assert {record["output_tokens"] for record in records} == {4}
    assert report["settings"]["load"] == "open"


def test_rank_not_offered_fails_before_the_run(server, tmp_path, capsys):
    status = main(["--url", server.url, "--num-requests", "2", "--rank-mix", "5:1",
                   "--output-prefix", str(tmp_path / "x"), "--no-progress"])
    assert status == 1
    assert "rank(s) [5] are not offered" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("mode, message", [
    ([], "all 3 requests failed (by HTTP status: 422: 3)"),
    (["--sweep"], "every request failed at rank(s) [0, 1, 2, 4, 8, 16]"),
])
def test_run_where_every_request_fails_exits_1(server, tmp_path, capsys, mode, message):
    prefix = tmp_path / "failing"
    # More output tokens than the server's max_tokens_limit: every request gets HTTP 422.
    status = main(["--url", server.url, *mode, "--num-requests", "3", "--concurrency", "1", "--max-tokens", "100000",
                   "--output-prefix", str(prefix), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert f"matlora-bench: error: {message}; {prefix}.json has each request's error" in err
    assert (tmp_path / "failing.json").exists()


def test_sweep_writes_table_and_plot(server, tmp_path):
    prefix = tmp_path / "sweep"
    status = main(["--url", server.url, "--sweep", "--num-requests", "2", "--concurrency", "1",
                   "--max-tokens", "4", "--output-prefix", str(prefix), "--no-progress"])
    assert status == 0
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| rank | quality (answer_loss) |")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["0 (base)", "1", "2", "4", "8", "16"]
    assert table[2].split("|")[2].strip() == "3"
    rows = read_csv(f"{prefix}.csv")
    assert [row["rank"] for row in rows] == [str(rank) for rank in OFFERED]
    assert all(row["requests"] == "2" and row["errors"] == "0" for row in rows)


# --- a server that is not matlora ------------------------------------------------------------------------------

def fake_openai_server(method: str, path: str, body: object):
    if path == "/v1/models":
        return 200, {}, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}
    events = (b'data: {"choices":[{"index":0,"text":"4","finish_reason":null}]}\n\n'
              b'data: {"choices":[{"index":0,"text":" apples","finish_reason":"length"}]}\n\n'
              b'data: [DONE]\n\n')
    return 200, {"Content-Type": "text/event-stream"}, events


def test_other_server_gets_no_rank(tmp_path):
    with stub_server(fake_openai_server) as (url, seen):
        status = main(["--openai-base-url", f"{url}/v1", "--num-requests", "2", "--concurrency", "1",
                       "--rank-mix", "4:1", "--ignore-eos", "--output-prefix", str(tmp_path / "other"),
                       "--no-progress"])
    assert status == 0
    posts = [request["body"] for request in seen if request["method"] == "POST"]
    assert len(posts) == 2
    assert all(body["model"] == "stub-model" for body in posts)
    assert all("rank" not in body and "ignore_eos" not in body for body in posts)
    report = json.loads((tmp_path / "other.json").read_text())
    assert [record["output_tokens"] for record in report["requests"]] == [2, 2]  # counted chunks, no usage sent
    assert report["summary"][0]["rank"] == "-"


def test_sweep_needs_matlora(tmp_path, capsys):
    with stub_server(fake_openai_server) as (url, _):
        status = main(["--openai-base-url", f"{url}/v1", "--sweep", "--num-requests", "1",
                       "--output-prefix", str(tmp_path / "s"), "--no-progress"])
    assert status == 1
    assert "--sweep needs a matlora server" in capsys.readouterr().err


def test_url_of_other_server_is_rejected(tmp_path, capsys):
    not_found = scripted((404, {}, {"detail": "Not Found"}))
    with stub_server(not_found) as (url, _):
        status = main(["--url", url, "--num-requests", "1", "--output-prefix", str(tmp_path / "n"), "--no-progress"])
    assert status == 1
    assert "is not a matlora server" in capsys.readouterr().err
