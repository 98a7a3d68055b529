"""Wiring: load the model and adapter, build the engine, policy and metrics, and mount the routes."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from transformers import PreTrainedTokenizerBase

from matlora_core import MatryoshkaConfig, MatryoshkaModel, load_adapter
from matlora_core.base_model import load_base_model

from .api import openai_routes, routes
from .api.errors import install_error_handlers
from .config import ServerSettings
from .engine import Engine, SchedulerConfig, TensorThread
from .engine.profiling import measure_decode_steps
from .generation import GenerationService, new_request_id
from .metrics import ServerMetrics
from .middleware import BearerAuthMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from .rank_policy import LatencyProfile, RankPolicy

logger = logging.getLogger(__name__)


@dataclass
class LoadedComponents:
    """A wrapped model ready to serve, with the names the API reports."""

    model: MatryoshkaModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    model_source: str
    adapter_path: str


def load_components(settings: ServerSettings) -> LoadedComponents:
    """Load the base model and the adapter; any problem raises before anything starts."""
    loaded = load_base_model(settings.model, dtype=settings.dtype, device=settings.resolved_device())
    model = load_adapter(loaded.model, settings.adapter, dtype=loaded.model.dtype)
    model.eval()
    return LoadedComponents(model=model, tokenizer=loaded.tokenizer, model_name=settings.served_model_name or
                            settings.model, model_source=loaded.source, adapter_path=str(settings.adapter))


def build_engine(components: LoadedComponents, settings: ServerSettings, metrics: ServerMetrics
                 ) -> tuple[Engine, RankPolicy]:
    config: MatryoshkaConfig = components.model.config
    default_rank = settings.default_rank if settings.default_rank is not None else config.served_default_rank
    if default_rank not in config.offered_ranks:
        raise ValueError(f"default_rank {default_rank} is not offered by {components.adapter_path}: choose one of "
                         f"{config.offered_ranks}")
    scheduler_config = SchedulerConfig(
        max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len,
        max_cached_tokens=settings.max_cached_tokens, max_prefill_tokens=settings.max_prefill_tokens,
        max_waiting=settings.max_waiting, split_by_rank=settings.rank_batching == "split",
    )
    profile = LatencyProfile({})
    policy = RankPolicy(config.offered_ranks, default_rank, profile, settings.lower_rank_under_load,
                        settings.overload_waiting_threshold)
    engine = Engine(components.model, components.tokenizer, scheduler_config, observers=[metrics, profile],
                    admission_hook=policy.lower_if_overloaded)
    if settings.profile_steps > 0:
        batch_sizes = sorted({min(size, settings.max_num_seqs) for size in settings.profile_batch_sizes})
        table = measure_decode_steps(engine, config.offered_ranks, batch_sizes, settings.profile_steps)
        for (rank, batch_size), seconds in table.items():
            profile.observe(rank, batch_size, seconds)
    return engine, policy


def create_app(settings: ServerSettings, components: LoadedComponents | None = None) -> FastAPI:
    """Build the app; without ``components``, load the model and run all tensor work on one TensorThread."""
    tensor_thread = None
    if components is None:
        tensor_thread = TensorThread()
        components = tensor_thread.run(load_components, settings)
    adapter_config = components.model.config
    metrics = ServerMetrics(adapter_config.offered_ranks)
    if tensor_thread is not None:
        engine, policy = tensor_thread.run(build_engine, components, settings, metrics)
    else:
        engine, policy = build_engine(components, settings, metrics)
    adapter_name = Path(components.adapter_path).name
    metrics.describe_server(components.model_name, adapter_name, adapter_config.inference_rule, settings.dtype,
                            adapter_config.profile)
    metrics.bind_engine(engine, policy)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(tensor_thread)
        logger.info("serving %s with adapter %s: ranks %s, default %d, rule %s, dtype %s", components.model_name,
                    components.adapter_path, policy.offered, policy.default_rank, adapter_config.inference_rule,
                    settings.dtype)
        yield
        app.state.shutting_down = True
        engine.shutdown(grace_seconds=settings.shutdown_grace_s)

    app = FastAPI(title="matlora", version="0.1.0", lifespan=lifespan,
                  description="Serve one Matryoshka LoRA adapter at a rank chosen per request.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.policy = policy
    app.state.metrics = metrics
    app.state.adapter_config = adapter_config
    app.state.model_name = components.model_name
    app.state.model_source = components.model_source
    app.state.adapter_name = adapter_name
    app.state.adapter_path = components.adapter_path
    app.state.shutting_down = False
    app.state.service = GenerationService(engine, components.tokenizer, policy, settings, metrics)

    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(openai_routes.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The last middleware added runs first: CORS (so preflights need no key), request id, body limit, keys.
    keys = settings.load_api_keys()
    open_paths = {"/health"} | (set() if settings.metrics_require_key else {"/metrics"})
    app.add_middleware(BearerAuthMiddleware, keys=keys, open_paths=open_paths)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware, new_id=new_request_id)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    if keys:
        logger.info("API keys required on every route except %s", ", ".join(sorted(open_paths)))
    return app
