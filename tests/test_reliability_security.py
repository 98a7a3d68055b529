"""API keys, CORS, and what requests can reach: keys on every route but /health, no file paths, no traces."""

from __future__ import annotations

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount

from matlora_server.config import ServerSettings

from .live_server import live_server, tiny_settings

KEYS = ("key-one", "key-two")
PROTECTED = [
    ("GET", "/v1/ranks", None), ("GET", "/v1/models", None), ("GET", "/docs", None), ("GET", "/redoc", None),
    ("GET", "/openapi.json", None), ("GET", "/docs/oauth2-redirect", None),
    ("POST", "/generate", {"prompt": "hi", "max_new_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("GET", "/no-such-route", None),
]
ORIGIN = "http://ui.example"


@pytest.fixture(scope="module")
def keyed_server():
    # The keys come from the environment in the comma-separated form.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MATLORA_API_KEYS", f" {KEYS[0]}, {KEYS[1]} ,")
        settings = tiny_settings()
    with live_server(settings) as server:
        yield server


def call(url: str, method: str, path: str, body: dict | None, key: str | None = None, **headers) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, url + path, json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_route_needs_key(keyed_server, method, path, body):
    missing = call(keyed_server.url, method, path, body)
    wrong = call(keyed_server.url, method, path, body, key="key-three")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["message"] == "missing API key: send Authorization: Bearer <key>"
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "invalid API key"
    assert "key-one" not in wrong.text


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("method, path, body", PROTECTED[:-1])
def test_route_accepts_each_key(keyed_server, method, path, body, key):
    assert call(keyed_server.url, method, path, body, key=key).status_code == 200


@pytest.mark.parametrize("header, message", [
    ("Bearer", "malformed Authorization header: it must be Bearer <key>"),
    ("Basic key-one", "malformed Authorization header: it must be Bearer <key>"),
    ("key-one", "malformed Authorization header: it must be Bearer <key>"),
    ("Bearer key-one-extra", "invalid API key"),
    ("Bearer key-one key-two", "invalid API key"),
])
def test_malformed_authorization_is_rejected(keyed_server, header, message):
    response = httpx.get(keyed_server.url + "/v1/models", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["error"]["message"] == message
    assert "key-one" not in response.json()["error"]["message"]


def test_health_and_metrics_are_open_by_default(keyed_server):
    assert httpx.get(keyed_server.url + "/health").status_code == 200
    assert httpx.get(keyed_server.url + "/metrics").status_code == 200


def test_metrics_can_require_key():
    with live_server(tiny_settings(api_keys=["secret"], metrics_require_key=True)) as server:
        missing = httpx.get(server.url + "/metrics")
        with_key = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer secret"})
        health = httpx.get(server.url + "/health")
    assert missing.status_code == 401
    assert with_key.status_code == 200
    assert health.status_code == 200


def test_keys_from_file(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("file-key-1\n\n  file-key-2  \n")
    with live_server(tiny_settings(api_keys_file=str(keys_file))) as server:
        statuses = [httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                    for key in ("file-key-1", "file-key-2", "other")]
    assert statuses == [200, 200, 401]


def test_missing_keys_file_is_an_error(tmp_path):
    settings = tiny_settings(api_keys_file=str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="absent.txt: file not found"):
        settings.load_api_keys()


@pytest.mark.parametrize("value, expected", [
    ("a,b", ["a", "b"]),
    (" a , b ,", ["a", "b"]),
    ('["x,y", "z"]', ["x,y", "z"]),
    ("", []),
])
def test_api_keys_environment_forms(monkeypatch, value, expected):
    monkeypatch.setenv("MATLORA_API_KEYS", value)
    monkeypatch.setenv("MATLORA_CORS_ORIGINS", "http://a.example,http://b.example")
    settings = ServerSettings()
    assert settings.api_keys == expected
    assert settings.cors_origins == ["http://a.example", "http://b.example"]


def test_invalid_json_keys_are_not_echoed(monkeypatch):
    monkeypatch.setenv("MATLORA_API_KEYS", '["my-secret-key"')
    with pytest.raises(ValueError, match="invalid JSON list") as raised:
        ServerSettings()
    assert "my-secret-key" not in str(raised.value)


# --- what a request can reach --------------------------------------------------------------------------------


def test_no_route_takes_a_file_path(keyed_server):
    """No route has a path parameter or a static mount, and no request field names a path, file or folder."""
    app = keyed_server.app
    assert not [route for route in app.routes if isinstance(route, Mount)]
    assert all(not route.param_convertors for route in app.routes if isinstance(route, APIRoute))
    schemas = app.openapi()["components"]["schemas"]
    request_models = [name for name in schemas if name.endswith("Request") or name in (
        "ChatMessage", "TextPart", "StreamOptions")]
    assert set(request_models) >= {"GenerateRequest", "CompletionRequest", "ChatCompletionRequest"}
    for name in request_models:
        for field in schemas[name]["properties"]:
            assert not any(word in field for word in ("path", "file", "dir", "url", "adapter")), (name, field)


def test_model_field_is_not_a_path(keyed_server):
    response = call(keyed_server.url, "POST", "/v1/completions",
                    {"model": "../../../etc/passwd", "prompt": "hi", "max_tokens": 2}, key=KEYS[0])
    assert response.status_code == 404
    assert "is not served here" in response.json()["error"]["message"]
    assert "root:" not in response.text


# --- CORS ----------------------------------------------------------------------------------------------------------


def preflight(url: str, path: str = "/generate", origin: str = ORIGIN) -> httpx.Response:
    return httpx.options(url + path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_by_default():
    with live_server(tiny_settings()) as server:
        simple = httpx.get(server.url + "/health", headers={"Origin": ORIGIN})
        options = preflight(server.url)
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers
    assert options.status_code == 405
    assert "access-control-allow-origin" not in options.headers


def test_preflight_without_cors_needs_key(keyed_server):
    response = preflight(keyed_server.url)
    assert response.status_code == 401
    assert "access-control-allow-origin" not in response.headers


def test_cors_for_configured_origin():
    with live_server(tiny_settings(api_keys=["secret"], cors_origins=[ORIGIN])) as server:
        allowed = preflight(server.url)
        other = preflight(server.url, origin="http://other.example")
        unauthorized = httpx.post(server.url + "/generate", json={"prompt": "hi"}, headers={"Origin": ORIGIN})
        served = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2},
                            headers={"Origin": ORIGIN, "Authorization": "Bearer secret"})
    assert allowed.status_code == 200                # a preflight needs no key
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == ORIGIN   # the browser may read the 401
    assert served.status_code == 200
    assert served.headers["access-control-allow-origin"] == ORIGIN
