"""The serving engine: continuous batching over a slot KV cache with one rank per sequence."""

from .engine import Engine, EngineStoppedError
from .stats import EngineObserver, StepStats
from .tensor_thread import TensorThread
from .request import FinishReason, RankReason, Request, RequestOutput, SamplingParams
from .scheduler import QueueFullError, SchedulerConfig

__all__ = [
    "Engine",
    "EngineObserver",
    "EngineStoppedError",
    "FinishReason",
    "QueueFullError",
    "RankReason",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "StepStats",
    "TensorThread",
]
