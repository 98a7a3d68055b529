"""Faults: a request that fails in the model or in sampling, NaN or inf logits, unexpected exceptions, SIGTERM on a
real server process, start-up with a broken adapter or a missing model, and invalid settings."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from matlora_server import __main__ as server_main
from matlora_server.config import ServerSettings
from matlora_server.engine import engine as engine_module
from matlora_server.generation import GenerationService
from matlora_server.options import build_parser, unknown_environment_variables

from .live_server import free_port, live_server, tiny_settings

POISON_PROMPT = "0123456789"
PROMPTS = ["Question: Tom has 3 apples", "The quick brown", POISON_PROMPT]


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def generate(url: str, prompt: str, request_id: str, max_new_tokens: int = 6) -> httpx.Response:
    return httpx.post(url + "/generate", timeout=60, headers={"X-Request-ID": request_id},
                      json={"prompt": prompt, "rank": 8, "max_new_tokens": max_new_tokens, "ignore_eos": True})


def error_logs(caplog, request_id: str) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.ERROR and request_id in record.getMessage()]


def assert_no_trace(text: str) -> None:
    assert "Traceback" not in text
    assert 'File "' not in text
    assert ".py" not in text


# --- one failing request in a batch ----------------------------------------------------------------------------


def poison_forward(engine, poison_token: int) -> None:
    """Make every prefill that contains ``poison_token`` raise, as a bug tied to one request's input would."""
    original = engine.runner.decoder.forward

    def forward(*args, **kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] > 1 and bool((input_ids == poison_token).any()):
            raise RuntimeError("injected failure in the forward")
        return original(*args, **kwargs)

    engine.runner.decoder.forward = forward


def poison_sampling(monkeypatch, poison_id: str) -> None:
    """Make sampling raise whenever the request ``poison_id`` is among the rows."""
    original = engine_module.sample_tokens

    def sample(logits, requests):
        if any(request.request_id == poison_id for request in requests):
            raise RuntimeError("injected failure in sampling")
        return original(logits, requests)

    monkeypatch.setattr(engine_module, "sample_tokens", sample)


@pytest.mark.parametrize("where", ["forward", "sampling"])
def test_failing_request_fails_alone(where, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="matlora_server")
    with live_server(tiny_settings()) as server:
        engine = server.app.state.engine
        alone = {prompt: generate(server.url, prompt, f"alone-{index}").json()["text"]
                 for index, prompt in enumerate(PROMPTS[:2])}

        if where == "forward":
            poison_forward(engine, server.app.state.service.tokenizer(POISON_PROMPT)["input_ids"][0])
        else:
            poison_sampling(monkeypatch, "poisoned-1")
        gate = threading.Event()
        step = engine.step
        engine.step = lambda: (gate.wait(30), step())    # hold the engine until all three requests wait
        ids = ["batch-0", "batch-1", "poisoned-1"]
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(generate, server.url, prompt, request_id)
                       for prompt, request_id in zip(PROMPTS, ids)]
            wait_until(lambda: engine.num_waiting() == 3)
            gate.set()
            responses = [future.result() for future in futures]
        wait_until(engine.is_idle)

    failed = responses[2]
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["request_id"] == "poisoned-1"
    assert error["type"] == "server_error"
    assert error["message"] == {"forward": "generation failed: model forward failed: RuntimeError",
                                "sampling": "generation failed: sampling failed: RuntimeError"}[where]
    assert_no_trace(failed.text)
    assert error_logs(caplog, "poisoned-1"), "the log names the failed request"
    for index in range(2):
        assert responses[index].status_code == 200, responses[index].text
        assert responses[index].json()["text"] == alone[PROMPTS[index]]
        assert responses[index].json()["finish_reason"] == "length"


def test_unexpected_exception_returns_500_without_trace(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="matlora_server")

    def broken(self, prompt, field="prompt"):
        raise RuntimeError("secret detail in /srv/app/tokenizer.py")

    monkeypatch.setattr(GenerationService, "tokenize_prompt", broken)
    with live_server(tiny_settings()) as server:
        response = httpx.post(server.url + "/generate", json={"prompt": "hi"}, headers={"X-Request-ID": "boom-1"})
        health = httpx.get(server.url + "/health")
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal server error (request id boom-1)", "type": "server_error",
                                        "param": None, "code": 500, "request_id": "boom-1"}
    assert "secret" not in response.text
    assert_no_trace(response.text)
    assert error_logs(caplog, "boom-1")
    assert health.status_code == 200


# --- NaN and inf logits -----------------------------------------------------------------------------------------


def spoil_logits(engine, phase: str, value: float, clean_calls: int = 0) -> None:
    """Replace one logit of every row by ``value`` in ``phase`` ("prefill" or "decode") after ``clean_calls``."""
    original = getattr(engine.runner, phase)
    calls = 0

    def spoiled(*args, **kwargs):
        nonlocal calls
        calls += 1
        logits = original(*args, **kwargs)
        if calls <= clean_calls:
            return logits
        logits = logits.clone()
        logits[:, 7] = value
        return logits

    setattr(engine.runner, phase, spoiled)


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_the_request(value):
    body = {"prompt": "Question: Tom has", "rank": 4, "max_new_tokens": 8, "ignore_eos": True}
    with live_server(tiny_settings()) as server:
        spoil_logits(server.app.state.engine, "prefill", value)
        plain = httpx.post(server.url + "/generate", json=body, timeout=30)
        streamed = httpx.post(server.url + "/generate", json={**body, "stream": True}, timeout=30)
        metrics = httpx.get(server.url + "/metrics").text

    for response in (plain, streamed):   # nothing was generated, so even the stream gets the HTTP status
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "generation failed: the model produced NaN or inf logits"
        assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    assert 'matlora_requests_total{outcome="error",rank="4"} 2.0' in metrics


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_mid_stream(value):
    """Logits go bad after three good decode steps: the stream ends with an error event and no garbage text."""
    body = {"prompt": "Question: Tom has", "rank": 4, "max_new_tokens": 8, "ignore_eos": True}
    with live_server(tiny_settings()) as server:
        good = httpx.post(server.url + "/generate", json={**body, "max_new_tokens": 4}).json()["text"]
        spoil_logits(server.app.state.engine, "decode", value, clean_calls=3)
        with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=30) as response:
            status = response.status_code
            events = sse_payloads(response)

    assert status == 200
    error = json.loads(events[-1])["error"]
    assert error["code"] == 500
    assert error["message"] == "generation failed: the model produced NaN or inf logits"
    assert "[DONE]" not in events
    text = "".join(json.loads(event)["text"] for event in events[:-1])
    assert text
    assert good.startswith(text), "only text from the four tokens with finite logits was sent"


# --- shutting down --------------------------------------------------------------------------------------------


def test_stopped_engine_returns_503():
    with live_server(tiny_settings()) as server:
        server.app.state.shutting_down = True
        server.app.state.engine.stop_accepting()
        response = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2})
        health = httpx.get(server.url + "/health").json()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert "shutting down" in response.json()["error"]["message"]
    assert health["status"] == "shutting_down"


def server_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MATLORA_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def start_server(model: Path | str, adapter: Path | str, port: int, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "matlora_server", "--model", str(model), "--adapter", str(adapter),
               "--host", "127.0.0.1", "--port", str(port), "--profile-steps", "0", "--device", "cpu", *options]
    return subprocess.Popen(command, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the server did not become healthy in {timeout:.0f} s")


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_drains_and_exits_zero(tiny_model_dir, tiny_adapter_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    grace = 60
    process = start_server(tiny_model_dir, tiny_adapter_dir, port, "--shutdown-grace-s", str(grace))
    try:
        wait_healthy(process, url)
        body = {"prompt": "Question: Tom has", "rank": 4, "max_new_tokens": 200, "ignore_eos": True, "stream": True}
        finished_at: list[float] = []
        results: list[list[str]] = []
        first_events = threading.Barrier(4)

        def stream_one() -> None:
            with httpx.stream("POST", url + "/generate", json=body, timeout=60) as response:
                events = []
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        if not events:
                            first_events.wait(30)
                        events.append(line[len("data: "):])
            finished_at.append(time.monotonic())
            results.append(events)

        streams = [threading.Thread(target=stream_one) for _ in range(3)]
        for thread in streams:
            thread.start()
        first_events.wait(30)                 # all three are generating
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = httpx.post(url + "/generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=10)
            late_outcome = late.status_code
        except httpx.ConnectError:
            late_outcome = "refused"
        for thread in streams:
            thread.join(timeout=grace + 10)
        exit_code = process.wait(timeout=grace + 10)
        exited_at = time.monotonic()
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    print(f"\nSIGTERM: a new request got {late_outcome}; the 3 streams finished {max(finished_at) - sent_at:.2f} s "
          f"and the process exited {exited_at - sent_at:.2f} s after the signal (grace {grace} s)")
    assert late_outcome in (503, "refused")
    assert exit_code == 0, output
    assert exited_at - sent_at < grace + 5
    assert len(results) == 3
    for events, finished in zip(results, finished_at):
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == 200
        assert finished > sent_at             # the request was still running when the signal came
    assert "received signal" in output
    assert not listening(port)


# --- refusing to start --------------------------------------------------------------------------------------


def broken_adapter(source: Path, target: Path, problem: str) -> tuple[Path, str, str]:
    """Copy the adapter folder with one problem; return the folder, the faulty file and the problem's text."""
    target.mkdir()
    config = (source / "adapter_config.json").read_text()
    weights = source / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    if problem == "corrupt weights":
        (target / "adapter_model.safetensors").write_bytes(b"\x00" * 7 + b"not a safetensors file")
        expected = "not a readable safetensors file"
    elif problem == "wrong shape":
        tensors[name] = torch.zeros(3, 5)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        expected = f"tensor {name} has shape [3, 5]"
    elif problem == "nan weights":
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(target / "adapter_model.safetensors"))
        expected = f"tensor {name} contains NaN or inf values"
    elif problem == "corrupt config":
        save_file(tensors, str(target / "adapter_model.safetensors"))
        config = config[: len(config) // 2]
        expected = "invalid JSON"
    else:
        raise ValueError(problem)
    (target / "adapter_config.json").write_text(config)
    file = "adapter_config.json" if problem == "corrupt config" else "adapter_model.safetensors"
    return target, str(target / file), expected


@pytest.mark.parametrize("problem", ["corrupt weights", "wrong shape", "nan weights", "corrupt config"])
def test_broken_adapter_refuses_to_start(problem, tiny_model_dir, tiny_adapter_dir, tmp_path, caplog):
    adapter, path, problem_text = broken_adapter(tiny_adapter_dir, tmp_path / "adapter", problem)
    port = free_port()
    code = server_main.main(["--model", str(tiny_model_dir), "--adapter", str(adapter), "--port", str(port),
                             "--profile-steps", "0", "--device", "cpu"])
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert code == 1
    assert any(path in message and problem_text in message for message in messages), messages
    assert not listening(port)


@pytest.mark.parametrize("case", ["missing folder", "folder without config.json", "missing adapter"])
def test_missing_model_refuses_to_start(case, tiny_model_dir, tiny_adapter_dir, tmp_path, caplog):
    model, adapter = str(tiny_model_dir), str(tiny_adapter_dir)
    if case == "missing folder":
        model = str(tmp_path / "no-such-model")
        expected = f"model {model!r} not found"
    elif case == "folder without config.json":
        model = str(tmp_path)
        expected = f"{tmp_path}: not a transformers model folder (config.json not found)"
    else:
        adapter = str(tmp_path / "no-such-adapter")
        expected = f"adapter folder {adapter} does not exist"
    port = free_port()
    code = server_main.main(["--model", model, "--adapter", adapter, "--port", str(port), "--profile-steps", "0",
                             "--device", "cpu"])
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert code == 1
    assert any(expected in message for message in messages), messages
    assert not listening(port)


def test_broken_adapter_process_exits_nonzero(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """The same check on a real process: exit status 1, the file and the problem on stderr, no listener."""
    adapter, path, _ = broken_adapter(tiny_adapter_dir, tmp_path / "adapter", "corrupt weights")
    port = free_port()
    process = start_server(tiny_model_dir, adapter, port)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert f"cannot start: {path}: not a readable safetensors file" in output
    assert not listening(port)


# --- invalid settings ---------------------------------------------------------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if main() gets as far as loading the model."""
    def load(settings):
        raise AssertionError("the model was loaded despite invalid settings")

    monkeypatch.setattr(server_main, "create_app", load)


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("options, expected", [
    (["--port", "abc"], "--port / MATLORA_PORT: Input should be a valid integer, unable to parse string as an "
                        "integer (got 'abc'); allowed: an integer from 1 to 65535"),
    (["--port", "0"], "--port / MATLORA_PORT: Input should be greater than or equal to 1 (got '0'); allowed: an "
                      "integer from 1 to 65535"),
    (["--device", "tpu"], "--device / MATLORA_DEVICE: unknown device 'tpu'; allowed: auto, cpu, cuda or cuda:N"),
    (["--device", "cuda"], "--device / MATLORA_DEVICE: device 'cuda' needs CUDA, which is not available here"),
    (["--log-level", "verbose"], "--log-level / MATLORA_LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or "
                                 "'ERROR' (got 'VERBOSE')"),
    (["--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA device, got device 'cpu'"),
    (["--profile-batch-sizes", "1,x"], "--profile-batch-sizes / MATLORA_PROFILE_BATCH_SIZES, item 2: Input should "
                                       "be a valid integer"),
    (["--lower-rank-under-load", "--max-prompt-tokens", "2000"], "--max-prompt-tokens 2000 must be below "
                                                                 "--max-model-len 1024"),
])
def test_invalid_setting_exits_2(options, expected, no_model_load, no_cuda, capsys):
    code = server_main.main(options)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(f"matlora-server: invalid setting: {expected}")
    assert "pydantic" not in err
    assert_no_trace(err)


def test_invalid_settings_one_line_each(no_model_load, capsys, monkeypatch):
    monkeypatch.setenv("MATLORA_MAX_WAITING", "many")
    code = server_main.main(["--port", "abc", "--rank-batching", "none"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert [line.split(":")[1].strip() for line in lines] == ["invalid setting"] * 3
    assert any("--max-waiting / MATLORA_MAX_WAITING" in line and "(got 'many')" in line for line in lines)
    assert any("--rank-batching / MATLORA_RANK_BATCHING: Input should be 'mixed' or 'split'" in line
               for line in lines)


def test_invalid_api_keys_are_not_echoed(no_model_load, capsys, monkeypatch):
    monkeypatch.setenv("MATLORA_API_KEYS", '["my-secret-key", 12345]')
    code = server_main.main([])
    err = capsys.readouterr().err
    assert code == 2
    assert "--api-keys / MATLORA_API_KEYS, item 2: Input should be a valid string" in err
    assert "my-secret-key" not in err
    assert "12345" not in err


def test_log_level_is_case_insensitive():
    assert ServerSettings(log_level="debug").log_level == "DEBUG"
    assert ServerSettings(log_level=" Warning ").log_level == "WARNING"


def test_cuda_device_index_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ServerSettings(device="CUDA:1").device == "cuda:1"
    assert ServerSettings(device="cuda").resolved_device() == "cuda"
    with pytest.raises(ValueError, match=r"device 'cuda:2' does not exist: this machine has 2 CUDA device\(s\)"):
        ServerSettings(device="cuda:2")


@pytest.mark.parametrize("content, expected", [
    (None, "absent.txt: file not found"),
    ("\n  \n", "the file contains no key; write one key per line"),
])
def test_bad_keys_file_exits_2_before_loading(content, expected, tiny_adapter_dir, tmp_path, no_model_load,
                                              capsys):
    keys_file = tmp_path / ("absent.txt" if content is None else "keys.txt")
    if content is not None:
        keys_file.write_text(content)
    code = server_main.main(["--adapter", str(tiny_adapter_dir), "--api-keys-file", str(keys_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("matlora-server: invalid setting: --api-keys-file / MATLORA_API_KEYS_FILE: ")
    assert expected in err


def test_default_rank_not_offered_exits_2_before_loading(tiny_adapter_dir, no_model_load, capsys):
    code = server_main.main(["--adapter", str(tiny_adapter_dir), "--default-rank", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"matlora-server: invalid setting: --default-rank / MATLORA_DEFAULT_RANK: rank 5 is not offered "
                   f"by the adapter {tiny_adapter_dir}; allowed: [0, 1, 2, 4, 8, 16]\n")


def test_unreadable_adapter_config_fails_before_loading(tmp_path, no_model_load, caplog):
    code = server_main.main(["--adapter", str(tmp_path / "no-such-adapter")])
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert code == 1
    assert messages == [f"cannot start: adapter folder {tmp_path / 'no-such-adapter'} does not exist or is not a "
                        "folder"]


def test_unknown_environment_variables_are_named():
    environ = {"MATLORA_API_KEY": "secret-1", "MATLORA_PROT": "8001", "MATLORA_PORT": "8001",
               "matlora_max_waiting": "4", "MATLORA_CACHE_DIR": "/tmp", "PATH": "/bin"}
    warnings = unknown_environment_variables(environ)
    assert len(warnings) == 2
    assert warnings[0].startswith("environment variable MATLORA_API_KEY is set, but matlora-server does not read it: "
                                  "the server reads MATLORA_API_KEYS")
    assert warnings[1].startswith("environment variable MATLORA_PROT is set, but matlora-server does not read it")
    assert not [warning for warning in warnings if "secret-1" in warning or "8001" in warning]


def test_unknown_environment_variable_is_logged(tiny_adapter_dir, no_model_load, monkeypatch, caplog):
    monkeypatch.setenv("MATLORA_API_KEY", "secret-2")
    server_main.main(["--adapter", str(tiny_adapter_dir), "--default-rank", "5"])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("MATLORA_API_KEY is set" in warning and "MATLORA_API_KEYS" in warning for warning in warnings)
    assert not [warning for warning in warnings if "secret-2" in warning]


def test_help_shows_each_option_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")     # one line per option
    text = build_parser().format_help()
    options = [line.strip() for line in text.split("options:")[1].splitlines() if line.strip()]
    assert "(default: None)" not in text
    assert all(line.count("(default:") <= 1 for line in options)
    assert re.search(r"--served-model-name SERVED_MODEL_NAME\s+model id reported by /v1/models \(default: --model\)\n",
                     text)
    assert "--dtype {float32,bfloat16,float16}" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in text
    assert "--rank-batching {mixed,split}" in text
    assert "(default: adapters/smollm2-135m-gsm8k-matryoshka in the source tree)" in text
    assert str(Path(server_main.__file__).parent.parent) not in text
    assert "(comma-separated, or a JSON list) (default: 1,4,16)" in text
    assert "require an API key on /metrics too (default: off)" in text
