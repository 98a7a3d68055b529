"""The matlora-client CLI, run in-process against a live tiny server, plus one run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from matlora_client.cli import main

from .live_server import free_port, live_server, tiny_settings

API_KEY = "cli-key"
PROMPT = "Question: A train travels"


@pytest.fixture(scope="module")
def server():
    settings = tiny_settings(api_keys=[API_KEY], profile_steps=1, profile_batch_sizes=[1])
    with live_server(settings) as running:
        yield running


@pytest.fixture()
def run_cli(server, capsys):
    """Return a runner of the CLI with --url and --api-key set, which returns (exit status, stdout, stderr)."""
    def run(*args: str, key: str | None = API_KEY) -> tuple[int, str, str]:
        options = ["--url", server.url] + (["--api-key", key] if key else [])
        status = main([*options, *args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def test_generate_json(run_cli):
    status, out, _ = run_cli("--json", "generate", PROMPT, "--rank", "4", "--max-tokens", "5")
    assert status == 0
    body = json.loads(out)
    assert body["rank"] == 4
    assert body["rank_reason"] == "explicit"
    assert body["usage"]["completion_tokens"] <= 5


def test_json_prints_null_fields(run_cli):
    status, out, _ = run_cli("--json", "generate", PROMPT, "--rank", "4", "--max-tokens", "3")
    body = json.loads(out)
    assert status == 0
    assert "requested_rank" in body
    assert body["requested_rank"] is None
    assert set(body["timings"]) == {"queue_ms", "time_to_first_token_ms", "time_per_output_token_ms", "e2e_ms"}


def test_generate_stream_json_lines(run_cli):
    status, out, _ = run_cli("generate", PROMPT, "--rank", "16", "--max-tokens", "5", "--stream", "--json")
    assert status == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["finished"] is True
    assert all(event["rank"] == 16 for event in events)
    assert events[-1]["usage"]["completion_tokens"] <= 5


def test_generate_plain_text(run_cli):
    _, expected, _ = run_cli("--json", "generate", PROMPT, "--rank", "2", "--max-tokens", "4")
    status, out, err = run_cli("generate", PROMPT, "--rank", "2", "--max-tokens", "4")
    assert status == 0
    assert out == json.loads(expected)["text"] + "\n"
    assert "rank 2 (explicit)" in err
    status, streamed, _ = run_cli("generate", PROMPT, "--rank", "2", "--max-tokens", "4", "--stream")
    assert streamed == out


def test_sampling_flags_are_sent(run_cli):
    flags = ["--temperature", "0.9", "--top-p", "0.9", "--top-k", "20", "--seed", "7", "--max-tokens", "6",
             "--stop", "###", "--stop", "\n\n"]
    first = run_cli("--json", "generate", PROMPT, *flags)
    second = run_cli("--json", "generate", PROMPT, *flags)
    assert first[0] == 0
    assert json.loads(first[1])["text"] == json.loads(second[1])["text"]


def test_ignore_eos_flag(run_cli):
    status, out, _ = run_cli("--json", "generate", PROMPT, "--rank", "4", "--max-tokens", "9", "--ignore-eos")
    assert status == 0
    assert json.loads(out)["usage"]["completion_tokens"] == 9


def test_latency_budget_flag(run_cli):
    status, out, _ = run_cli("--json", "generate", PROMPT, "--latency-budget-ms", "10000", "--max-tokens", "2")
    assert status == 0
    assert json.loads(out)["rank_reason"] == "latency_budget"


def test_chat_json_and_stream(run_cli):
    status, out, _ = run_cli("--json", "chat", "Two plus two?", "--system", "Be brief.", "--rank", "8",
                             "--max-tokens", "4")
    assert status == 0
    body = json.loads(out)
    assert body["rank"] == 8
    assert body["object"] == "chat.completion"
    status, streamed, err = run_cli("chat", "Two plus two?", "--system", "Be brief.", "--rank", "8",
                                    "--max-tokens", "4", "--stream")
    assert status == 0
    assert streamed == body["choices"][0]["message"]["content"] + "\n"
    assert "rank 8" in err


def test_ranks_json_and_table(run_cli):
    status, out, _ = run_cli("ranks", "--json")
    assert status == 0
    ranks = json.loads(out)
    assert [entry["rank"] for entry in ranks["data"]] == [0, 1, 2, 4, 8, 16]
    status, table, _ = run_cli("ranks")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["rank", "quality", "(answer_loss)"]
    assert lines[1].split()[:2] == ["0", "3"]
    assert lines[-2].split()[0] == "16"
    assert lines[-2].endswith("*")


def test_health_and_models(run_cli):
    status, out, _ = run_cli("--json", "health")
    assert status == 0
    assert json.loads(out)["status"] == "ok"
    status, out, _ = run_cli("health")
    assert out.startswith("ok: model tiny-llama")
    status, out, _ = run_cli("--json", "models")
    assert json.loads(out)["data"][-1]["offered_ranks"] == [0, 1, 2, 4, 8, 16]


def test_server_error_exits_non_zero(run_cli):
    status, out, err = run_cli("--json", "generate", PROMPT, "--rank", "5")
    assert status == 1
    assert "rank 5 is not offered" in err
    error = json.loads(out)["error"]
    assert error["param"] == "rank"
    assert error["code"] == 422


def test_missing_key_exits_non_zero(run_cli):
    status, _, err = run_cli("ranks", key=None)
    assert status == 1
    assert "missing API key" in err


def test_environment_sets_url_and_key(server, monkeypatch, capsys):
    monkeypatch.setenv("MATLORA_URL", server.url)
    monkeypatch.setenv("MATLORA_API_KEY", API_KEY)
    assert main(["ranks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_rank"] == 16


def test_rank_and_budget_are_exclusive(run_cli):
    with pytest.raises(SystemExit) as caught:
        run_cli("generate", PROMPT, "--rank", "4", "--latency-budget-ms", "20")
    assert caught.value.code == 2


@pytest.mark.parametrize("arguments, message", [
    (["--timeout", "0", "health"], "argument --timeout: must be a number of seconds above 0, got '0'"),
    (["--timeout", "-1", "health"], "argument --timeout: must be a number of seconds above 0, got '-1'"),
    (["health", "--timeout", "nan"], "argument --timeout: must be a number of seconds above 0, got 'nan'"),
    (["--url", "127.0.0.1:8000", "health"], "argument --url: the URL must start with http:// or https://"),
    (["--url", "http://", "health"], "argument --url: the URL 'http://' has no host"),
    (["--max-retries", "-1", "health"], "--max-retries must be 0 or more, got -1"),
])
def test_invalid_arguments_exit_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(arguments)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_url_in_environment_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("MATLORA_URL", "localhost:8000")
    with pytest.raises(SystemExit) as caught:
        main(["health"])
    assert caught.value.code == 2
    assert "argument --url: the URL must start with http:// or https://" in capsys.readouterr().err


def test_unreachable_server_exits_non_zero(capsys):
    status = main(["--url", f"http://127.0.0.1:{free_port()}", "--max-retries", "0", "health"])
    assert status == 1
    assert "failed" in capsys.readouterr().err


def test_cli_as_subprocess(server):
    command = [sys.executable, "-m", "matlora_client.cli", "--url", server.url, "--json", "health"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"
