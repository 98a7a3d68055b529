"""Train a LoRA, DyLoRA or Matryoshka adapter on prompt/completion data.

The three kinds differ only in the training diagonal p of y = W0·x + B·diag(p)·A·x:

- ``matryoshka``: p = P built from the nested ranks S, every step;
- ``lora``: S = {r_max}, so p = s(r_max) everywhere;
- ``dylora``: each micro-batch samples one rank b from S and uses s(b) times a 0/1 mask of the first b columns,
  so with gradient accumulation one optimizer step mixes several sampled ranks.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from .adapter import check_output_folder, save_adapter, validate_tensors
from .base_model import load_base_model
from .config import ADAPTER_KINDS, DEFAULT_TARGET_MODULES, MatryoshkaConfig, format_choices
from .data import IGNORE_INDEX, Example, TokenizedExample, collate, load_examples, tokenize_example
from .model import MatryoshkaModel
from .ranks import INFERENCE_RULES, SCALE_RULES, dylora_diagonal

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "cosine")
TRAIN_DTYPES = ("float32", "bfloat16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
STATE_NAME = "trainer_state.pt"


def option_flag(name: str) -> str:
    """Return the command-line flag of a TrainConfig field: ``max_steps`` becomes ``--max-steps``."""
    return "--" + name.replace("_", "-")


def option(default, help: str, **kwargs):
    """Declare a TrainConfig field with the help text of its command-line option."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Options of ``matlora train``; each field is the command-line option of the same name."""

    model: str = option(None, "base model: the built-in name smollm2-135m-instruct, a model folder or a hub id",
                        required=True)
    train_file: str = option(None, "JSON Lines file with question/answer or prompt/completion objects",
                             required=True)
    output_dir: str = option(None, "folder of the final adapter; checkpoints go to checkpoint-N inside it",
                             required=True)
    adapter_kind: str = option("matryoshka", f"training diagonal: {format_choices(ADAPTER_KINDS)}")
    r_max: int = option(32, "rank of the A and B factors")
    ranks: list[int] = option(lambda: [1, 2, 4, 8, 16, 32, 64],
                              "nested ranks S, comma-separated; ranks above r_max are dropped (lora uses r_max)")
    scale_rule: str = option("sqrt", "rank scale s(r): none (1), rank (1/r) or sqrt (1/sqrt r)")
    inference_rule: str = option("partial_sum", "serving rule written into a matryoshka adapter: paper or "
                                 "partial_sum (lora and dylora adapters are served with paper)")
    target_modules: list[str] = option(lambda: list(DEFAULT_TARGET_MODULES),
                                       "names of the linear layers to adapt, comma-separated")
    learning_rate: float = option(2e-4, "peak learning rate of AdamW")
    lr_schedule: str = option("cosine", f"decay after warm-up: {format_choices(SCHEDULES)}")
    warmup_steps: int = option(10, "optimizer steps of linear warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    max_steps: int | None = option(None, "optimizer steps to run (give this or --epochs)")
    epochs: float | None = option(None, "passes over the data (give this or --max-steps)")
    batch_size: int = option(8, "examples per micro-batch")
    gradient_accumulation: int = option(1, "micro-batches per optimizer step")
    max_length: int = option(384, "maximum tokens per example, prompt included; longer examples are cut from the "
                             "end, and an example whose prompt fills it is dropped")
    train_limit: int | None = option(None, "use only the first N examples of the file")
    seed: int = option(0, "seed of the adapter initialisation, the data order and DyLoRA's rank sampling")
    dtype: str = option("float32", "dtype of the base model: float32 or bfloat16 (adapter weights stay float32)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    device: str = option("auto", "auto, cpu or cuda")
    log_every: int = option(10, "optimizer steps between log lines")
    save_every: int = option(0, "optimizer steps between checkpoints; 0 writes only the final adapter")
    save_dtype: str = option("float32", "dtype of the final adapter file: float32, bfloat16 or float16")
    resume: str | None = option(None, "checkpoint-N folder to continue from, with the same options")
    overwrite: bool = option(False, "replace an adapter already in --output-dir")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        choices = [
            ("adapter_kind", ADAPTER_KINDS),
            ("scale_rule", SCALE_RULES),
            ("inference_rule", INFERENCE_RULES),
            ("lr_schedule", SCHEDULES),
            ("dtype", TRAIN_DTYPES),
            ("save_dtype", SAVE_DTYPES),
        ]
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{option_flag(name)} {value!r} is invalid: choose {format_choices(allowed)}")

        if self.max_steps is None and self.epochs is None:
            raise ValueError("missing run length: give --max-steps or --epochs (exactly one)")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"--max-steps {self.max_steps} and --epochs {self.epochs} are both given: "
                             "give exactly one of them")

        # Each check: whether the value is valid, the field, and the rule it breaks otherwise.
        bounds = [
            (self.r_max >= 1, "r_max", "an integer >= 1"),
            (self.learning_rate > 0, "learning_rate", "a number > 0"),
            (self.weight_decay >= 0, "weight_decay", "a number >= 0"),
            (self.batch_size >= 1, "batch_size", "an integer >= 1"),
            (self.gradient_accumulation >= 1, "gradient_accumulation", "an integer >= 1"),
            (self.max_length >= 2, "max_length", "an integer >= 2"),
            (self.warmup_steps >= 0, "warmup_steps", "an integer >= 0"),
            (self.max_grad_norm > 0, "max_grad_norm", "a number > 0"),
            (self.log_every >= 1, "log_every", "an integer >= 1"),
            (self.save_every >= 0, "save_every", "an integer >= 0"),
            (self.train_limit is None or self.train_limit >= 1, "train_limit", "an integer >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "an integer >= 1"),
            (self.epochs is None or self.epochs > 0, "epochs", "a number > 0"),
        ]
        for valid, name, rule in bounds:
            if not valid:
                raise ValueError(f"{option_flag(name)} {getattr(self, name)} is invalid: it must be {rule}")
        if not any(r <= self.r_max for r in self.ranks):
            ranks = ",".join(map(str, self.ranks))
            raise ValueError(f"--ranks {ranks} is invalid: at least one rank must be <= --r-max {self.r_max}")

    def trained_ranks(self) -> list[int]:
        if self.adapter_kind == "lora":
            return [self.r_max]
        return sorted({r for r in self.ranks if 1 <= r <= self.r_max})


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda is invalid: no CUDA device is available; use --device cpu or auto")
    return name


def batch_order(lengths: list[int], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Return the batches of one epoch: shuffled, then sorted by length inside windows of 32 batches.

    Grouping similar lengths cuts padding. The order depends only on (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one.
    """
    rng = random.Random(seed * 100_003 + epoch)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    window = batch_size * 32
    batches = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def learning_rate_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Return the multiplier of the base learning rate at optimizer ``step`` (linear warm-up, then decay)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def trainable_examples(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, config: TrainConfig
) -> list[TokenizedExample]:
    """Tokenize the examples, dropping those whose prompt fills max_length and leaves no completion token.

    A batch without a single completion token has a loss of 0/0 = NaN, which would turn every weight into NaN.
    """
    tokenized = [tokenize_example(e, tokenizer, config.max_length) for e in examples]
    trainable = [t for t in tokenized if any(label != IGNORE_INDEX for label in t.labels)]
    if not trainable:
        raise ValueError(f"invalid max_length={config.max_length}: every prompt in {config.train_file} fills it, so "
                         "no completion token is left to train on; raise --max-length")
    if len(trainable) < len(tokenized):
        logger.warning("dropped %d of %d examples whose prompt fills max_length=%d",
                       len(tokenized) - len(trainable), len(tokenized), config.max_length)
    return trainable


class Trainer:
    """Owns the model, the data order, the optimizer and the checkpoints of one training run."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        # --resume allows an existing adapter: a resumed run usually writes into the folder of the run it continues.
        check_output_folder(config.output_dir, "--output-dir", overwrite=config.overwrite or bool(config.resume))
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)

        loaded = load_base_model(config.model, dtype=config.dtype, device=self.device)
        self.tokenizer = loaded.tokenizer
        adapter_config = MatryoshkaConfig(
            r_max=config.r_max,
            trained_ranks=config.trained_ranks(),
            scale_rule=config.scale_rule,
            inference_rule="paper" if config.adapter_kind != "matryoshka" else config.inference_rule,
            target_modules=list(config.target_modules),
            adapter_kind=config.adapter_kind,
            base_model=config.model,
        )
        self.model = MatryoshkaModel(loaded.model, adapter_config)
        self.model.train()
        if config.gradient_checkpointing:
            loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        examples = load_examples(config.train_file, adapter_config.prompt_format, limit=config.train_limit)
        self.examples = trainable_examples(examples, self.tokenizer, config)
        batches_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        if config.max_steps is not None:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, int(config.epochs * batches_per_epoch / config.gradient_accumulation))

        self.optimizer = torch.optim.AdamW(self.model.adapter_parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, config, self.total_steps))
        self.rank_rng = random.Random(config.seed)
        self.step = 0
        self.batches_consumed = 0
        self._epoch_batches: tuple[int, list[list[int]]] | None = None
        if config.resume:
            self.load_checkpoint(Path(config.resume))

    # --- data ------------------------------------------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        lengths = [len(e.input_ids) for e in self.examples]
        per_epoch = math.ceil(len(lengths) / self.config.batch_size)
        epoch, index = divmod(self.batches_consumed, per_epoch)
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, batch_order(lengths, self.config.batch_size, epoch, self.config.seed))
        self.batches_consumed += 1
        items = [self.examples[i] for i in self._epoch_batches[1][index]]
        return {k: v.to(self.device) for k, v in collate(items, self.tokenizer.pad_token_id).items()}

    def training_diagonal(self) -> torch.Tensor:
        config = self.model.config
        if config.adapter_kind == "dylora":
            sampled = self.rank_rng.choice(config.trained_ranks)
            return dylora_diagonal(sampled, config.r_max, config.scale_rule)
        return self.model.training_diagonal()

    # --- the loop --------------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, int]:
        """Run one optimizer step; return the mean loss and the number of tokens processed."""
        accumulation = self.config.gradient_accumulation
        total_loss, tokens = 0.0, 0
        for _ in range(accumulation):
            batch = self.next_batch()
            with self.model.training_mode_diagonal(self.training_diagonal()):
                loss = self.model(**batch).loss / accumulation
                loss.backward()
            total_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())

        torch.nn.utils.clip_grad_norm_(self.model.adapter_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total_loss, tokens

    def train(self) -> Path:
        config = self.config
        logger.info("training %s adapter: r_max=%d ranks=%s scale=%s lr=%g steps=%d batch=%dx%d on %s (%s)",
                    config.adapter_kind, config.r_max, self.model.config.trained_ranks, config.scale_rule,
                    config.learning_rate, self.total_steps, config.batch_size, config.gradient_accumulation,
                    self.device, config.dtype)
        started = time.perf_counter()
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not config.progress, unit="step")
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        while self.step < self.total_steps:
            loss, tokens = self.train_step()
            window_loss += loss
            window_tokens += tokens
            elapsed = time.perf_counter() - window_start
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tokens_per_s=f"{window_tokens / max(elapsed, 1e-9):.0f}")

            if self.step % config.log_every == 0 or self.step == self.total_steps:
                steps_in_window = (self.step - 1) % config.log_every + 1
                logger.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", self.step, self.total_steps,
                            window_loss / steps_in_window, self.scheduler.get_last_lr()[0],
                            window_tokens / max(elapsed, 1e-9))
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if config.save_every and self.step % config.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint(Path(config.output_dir) / f"checkpoint-{self.step}")
        progress.close()

        seconds = time.perf_counter() - started
        self.model.config.training = {**self.summary(), "train_seconds": round(seconds, 1)}
        output = Path(config.output_dir)
        save_adapter(self.model, output, dtype=getattr(torch, config.save_dtype))
        logger.info("wrote adapter to %s after %d steps in %.0f s", output, self.step, seconds)
        return output

    def summary(self) -> dict:
        options = asdict(self.config)
        for key in ("resume", "progress", "output_dir", "overwrite"):
            options.pop(key)
        return {**options, "steps": self.step, "examples": len(self.examples)}

    # --- checkpoints -----------------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path) -> None:
        """Write the adapter in float32 and the trainer state, so that a resumed run matches an uninterrupted one."""
        save_adapter(self.model, directory, dtype=torch.float32)
        torch.save({
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rank_rng": self.rank_rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "total_steps": self.total_steps,
        }, directory / STATE_NAME)
        logger.info("saved checkpoint %s", directory)

    def load_checkpoint(self, directory: Path) -> None:
        state_path = directory / STATE_NAME
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path}: not found; --resume takes a checkpoint-N folder of a run")
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        # The shapes come from the wrapped layers: the base model's target layers are no longer nn.Linear.
        shapes = {key: tuple(tensor.shape) for key, tensor in self.model.adapter_state_dict().items()}
        validate_tensors(tensors, shapes, directory)
        self.model.load_adapter_state_dict(tensors)
        state = torch.load(state_path, weights_only=False)
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"{state_path}: the checkpoint was made for {state['total_steps']} steps, "
                             f"this run has {self.total_steps}; resume with the same options")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rank_rng.setstate(state["rank_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.batches_consumed = state["batches_consumed"]
        logger.info("resumed from %s at step %d", directory, self.step)


def train(config: TrainConfig) -> Path:
    return Trainer(config).train()
