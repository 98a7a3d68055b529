"""A real uvicorn server on 127.0.0.1 serving the tiny test model, for tests that talk HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from matlora_core import MatryoshkaModel
from matlora_server.app import LoadedComponents, create_app
from matlora_server.config import ServerSettings

from .conftest import build_tiny_llama, build_tokenizer, make_adapter_config, randomize_adapter

TINY_PROFILE = {0: {"answer_loss": 3.0, "accuracy": 0.0}, 4: {"answer_loss": 2.5, "accuracy": 0.1},
                16: {"answer_loss": 2.0, "accuracy": 0.2}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_components(rule: str = "paper", seed: int = 0) -> LoadedComponents:
    """The tiny random Llama with a random adapter (r_max 16, S = 1..16 by powers of two)."""
    tokenizer = build_tokenizer()
    base = build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=seed)
    model = MatryoshkaModel(base, make_adapter_config(inference_rule=rule, profile=TINY_PROFILE,
                                                      quality_metric="answer_loss"))
    randomize_adapter(model, seed=seed + 1, scale=0.2)
    model.eval()
    return LoadedComponents(model=model, tokenizer=tokenizer, model_name="tiny-llama", model_source="memory",
                            adapter_path="tiny-matryoshka")


def tiny_settings(**overrides) -> ServerSettings:
    fields = dict(max_model_len=256, max_prompt_tokens=128, max_cached_tokens=4096, max_num_seqs=8,
                  profile_batch_sizes=[1, 4], profile_steps=1, default_max_tokens=16, shutdown_grace_s=5)
    fields.update(overrides)
    return ServerSettings(**fields)


@dataclass
class LiveServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, **kwargs)


@contextmanager
def live_server(settings: ServerSettings | None = None, components: LoadedComponents | None = None
                ) -> Iterator[LiveServer]:
    """Start the app under uvicorn in a thread on a free loopback port; stop it on exit."""
    settings = settings or tiny_settings()
    app = create_app(settings, components or tiny_components())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start within 30 s")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", app=app, server=server, thread=thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
