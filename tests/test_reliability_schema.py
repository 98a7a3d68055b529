"""Property-based run of the server's own OpenAPI schema with schemathesis against a live tiny server.

Every operation gets generated requests, valid ones (positive) and, where the schema has a body to break, invalid
ones (negative). No response may be a 5xx. Each must have a documented status code and content type and match its
schema, and a request that breaks the schema must be rejected.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode, checks  # noqa: E402

from .live_server import live_server, tiny_settings  # noqa: E402

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance, checks.negative_data_rejection]
GET_OPERATIONS = [("GET", "/health"), ("GET", "/v1/ranks"), ("GET", "/v1/models")]
POST_OPERATIONS = [("POST", "/generate"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
EXAMPLES = {"GET": 5, "POST": 40}


@pytest.fixture(scope="module")
def api_schema():
    # A small max_tokens_limit keeps every accepted request short; larger values get 422 at once.
    with live_server(tiny_settings(max_tokens_limit=8, default_max_tokens=4)) as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")


def with_stream(case):
    case.body = {**case.body, "stream": True}
    return case


def run_operation(api_schema, method: str, path: str, mode: GenerationMode, stream: bool = False) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    if stream:
        strategy = strategy.map(with_stream)

    @given(case=strategy)
    # derandomize: the same examples on every run, so a failure reproduces and CI never flakes on a new draw.
    @settings(max_examples=EXAMPLES[method], deadline=10_000, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(checks=CHECKS, timeout=30)

    check()


def test_schema_lists_every_route(api_schema):
    listed = {(operation.ok().method.upper(), operation.ok().path) for operation in api_schema.get_all_operations()}
    assert listed == set(GET_OPERATIONS + POST_OPERATIONS)


@pytest.mark.parametrize("method, path", GET_OPERATIONS + POST_OPERATIONS)
def test_valid_requests_match_schema(api_schema, method, path):
    run_operation(api_schema, method, path, GenerationMode.POSITIVE)


@pytest.mark.parametrize("method, path", POST_OPERATIONS)
def test_invalid_requests_are_rejected(api_schema, method, path):
    run_operation(api_schema, method, path, GenerationMode.NEGATIVE)


@pytest.mark.parametrize("method, path", POST_OPERATIONS)
def test_streamed_requests_match_schema(api_schema, method, path):
    run_operation(api_schema, method, path, GenerationMode.POSITIVE, stream=True)
