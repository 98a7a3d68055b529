"""The adapter config: PEFT's LoRA fields plus a ``matryoshka`` section.

On disk it is ``adapter_config.json`` in PEFT's format, with ``r = lora_alpha = r_max`` so that PEFT loads the
full-rank adapter as W0 + B·A. That is the adapter with p = 1, not the trained function W0 + B·diag(P)·A:
``matlora export`` writes a PEFT adapter that reproduces a served rank exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ranks import INFERENCE_RULES, SCALE_RULES, normalize_ranks

ADAPTER_KINDS = ("matryoshka", "lora", "dylora")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def format_choices(values) -> str:
    """Join allowed values for a message: ``a, b or c``."""
    values = [str(value) for value in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


class AdapterConfigError(ValueError):
    """An adapter config that is missing a field or holds an invalid value."""


@dataclass
class MatryoshkaConfig:
    """Everything needed to rebuild and serve a nested-rank adapter."""

    r_max: int
    trained_ranks: list[int]                   # the set S of nested ranks used in training
    scale_rule: str = "sqrt"                   # s(r): none = 1, rank = 1/r, sqrt = 1/sqrt(r)
    inference_rule: str = "paper"              # how rank r is served: paper or partial_sum
    serving_ranks: list[int] | None = None     # ranks offered by a server; None means {0} and S
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    adapter_kind: str = "matryoshka"           # matryoshka, lora (S = {r_max}) or dylora
    base_model: str = ""                       # the model name the adapter was trained on
    default_rank: int | None = None            # served when a request names no rank; None means r_max
    prompt_format: str = "Question: {question}\nAnswer: "
    quality_metric: str | None = None          # which profile entry is the per-rank quality figure
    profile: dict[int, dict[str, float]] = field(default_factory=dict)  # measured metrics per rank
    training: dict[str, Any] = field(default_factory=dict)             # how the adapter was made

    def __post_init__(self) -> None:
        self.validate()

    @property
    def offered_ranks(self) -> list[int]:
        if self.serving_ranks is not None:
            return sorted(set(self.serving_ranks))
        return sorted({0, *self.trained_ranks})

    @property
    def served_default_rank(self) -> int:
        return self.r_max if self.default_rank is None else self.default_rank

    def quality(self, rank: int) -> float | None:
        """Return the measured quality figure at ``rank``, or None when the profile has none."""
        if self.quality_metric is None:
            return None
        return self.profile.get(rank, {}).get(self.quality_metric)

    def validate(self) -> None:
        if not isinstance(self.r_max, int) or self.r_max < 1:
            raise AdapterConfigError(f"r_max must be an integer >= 1, got {self.r_max!r}")
        for rank in self.trained_ranks:
            if not 1 <= rank <= self.r_max:
                raise AdapterConfigError(f"trained rank {rank} is outside 1..r_max={self.r_max}")
        self.trained_ranks = normalize_ranks(self.trained_ranks, self.r_max)
        if self.scale_rule not in SCALE_RULES:
            raise AdapterConfigError(
                f"scale_rule {self.scale_rule!r} is invalid: allowed values are {format_choices(SCALE_RULES)}"
            )
        if self.inference_rule not in INFERENCE_RULES:
            allowed = format_choices(INFERENCE_RULES)
            raise AdapterConfigError(f"inference_rule {self.inference_rule!r} is invalid: allowed values are {allowed}")
        if self.adapter_kind not in ADAPTER_KINDS:
            raise AdapterConfigError(
                f"adapter_kind {self.adapter_kind!r} is invalid: allowed values are {format_choices(ADAPTER_KINDS)}"
            )
        for rank in self.offered_ranks:
            if not 0 <= rank <= self.r_max:
                raise AdapterConfigError(f"serving rank {rank} is outside 0..r_max={self.r_max}")
        if self.default_rank is not None and self.default_rank not in self.offered_ranks:
            raise AdapterConfigError(
                f"default_rank {self.default_rank} is not an offered rank: offered ranks are {self.offered_ranks}"
            )
        if not self.target_modules:
            raise AdapterConfigError("target_modules is empty: name at least one linear module")
        for rank in self.profile:
            if not 0 <= rank <= self.r_max:
                raise AdapterConfigError(f"profile rank {rank} is outside 0..r_max={self.r_max}")

    def to_peft_dict(self) -> dict[str, Any]:
        """Return the config as PEFT's ``adapter_config.json`` with the Matryoshka fields in one section."""
        matryoshka = {
            "adapter_kind": self.adapter_kind,
            "r_max": self.r_max,
            "trained_ranks": self.trained_ranks,
            "scale_rule": self.scale_rule,
            "inference_rule": self.inference_rule,
            "serving_ranks": self.serving_ranks,
            "default_rank": self.default_rank,
            "prompt_format": self.prompt_format,
            "quality_metric": self.quality_metric,
            "profile": {str(rank): metrics for rank, metrics in sorted(self.profile.items())},
            "training": self.training,
        }
        fields = peft_lora_fields(self.base_model, self.r_max, self.r_max, self.target_modules)
        return {**fields, "matryoshka": matryoshka}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "MatryoshkaConfig":
        """Read a config written by :meth:`to_peft_dict`; errors name ``source`` and the field."""
        section = data.get("matryoshka")
        if not isinstance(section, dict):
            raise AdapterConfigError(
                f"{source}: missing the 'matryoshka' section; a plain PEFT LoRA adapter is read with `matlora import`"
            )
        if data.get("peft_type", "LORA") != "LORA":
            raise AdapterConfigError(f"{source}: peft_type {data.get('peft_type')!r} is not supported, only LORA")
        r_max = _field(section, "r_max", int, source)
        if data.get("r") not in (None, r_max):
            raise AdapterConfigError(f"{source}: r={data.get('r')} differs from matryoshka.r_max={r_max}")
        try:
            return cls(
                r_max=r_max,
                trained_ranks=list(_field(section, "trained_ranks", list, source)),
                scale_rule=_field(section, "scale_rule", str, source),
                inference_rule=_field(section, "inference_rule", str, source),
                serving_ranks=section.get("serving_ranks"),
                target_modules=list(_field(data, "target_modules", list, source)),
                adapter_kind=section.get("adapter_kind", "matryoshka"),
                base_model=data.get("base_model_name_or_path") or "",
                default_rank=section.get("default_rank"),
                prompt_format=section.get("prompt_format", cls.prompt_format),
                quality_metric=section.get("quality_metric"),
                profile={int(rank): dict(metrics) for rank, metrics in (section.get("profile") or {}).items()},
                training=dict(section.get("training") or {}),
            )
        except AdapterConfigError as error:
            raise AdapterConfigError(f"{source}: {error}") from None
        except (TypeError, ValueError) as error:
            raise AdapterConfigError(f"{source}: invalid matryoshka section: {error}") from None


def peft_lora_fields(
    base_model: str, r: int, lora_alpha: float, target_modules: list[str], use_rslora: bool = False
) -> dict[str, Any]:
    """Return the fields of a plain PEFT LoRA ``adapter_config.json``; PEFT's scaling is lora_alpha / r.

    With ``use_rslora`` PEFT scales by lora_alpha / sqrt(r) instead.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": use_rslora,
        "modules_to_save": None,
        "target_modules": list(target_modules),
    }


def _field(data: dict[str, Any], name: str, kind: type, source: str) -> Any:
    if name not in data:
        raise AdapterConfigError(f"{source}: missing field {name!r}")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AdapterConfigError(f"{source}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value
