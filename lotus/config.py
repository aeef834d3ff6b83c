"""The training config: typed sections validated from YAML, with ``--set a.b=value`` overrides."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from lotus.errors import ConfigError
from lotus.features.distill.config import DistillConfig
from lotus.features.ema.config import EmaConfig
from lotus.features.mixup.config import MixupConfig
from lotus.features.outliers.config import OutliersConfig
from lotus.features.outliers.op_config import OPConfig
from lotus.features.pruning.config import PruningConfig
from lotus.features.resolution.config import ResolutionConfig
from lotus.features.schedule.config import ScheduleConfig
from lotus.features.schedule.plan import Schedule
from lotus.features.tickets.config import TicketsConfig
from lotus.parallel.compat import check_compat
from lotus.parallel.config import ParallelConfig
from lotus.safe_io import check_run_name
from lotus.schema import to_dict, validate
from lotus.transform_config import TransformConfig

__all__ = [
    "Config", "ModelConfig", "DataConfig", "AugmentConfig", "TransformConfig", "OptimConfig", "TrainConfig", "OutputConfig",
    "load_config", "config_from_dict", "config_to_dict", "apply_overrides", "save_config",
]


MAX_IMG_SIZE = 4096  # pixels a side: larger position embeddings / activations do not fit any machine
MAX_BATCH_SIZE = 1 << 20


@dataclass
class ModelConfig:
    """Which timm model to build. Unset sizes come from the data (channels, classes) or the model."""

    name: str = "lotus_vit_tiny"
    img_size: int | None = field(default=None, metadata={"min": 1, "max": MAX_IMG_SIZE})
    patch_size: int | None = field(default=None, metadata={"min": 1})
    in_chans: int | None = field(default=None, metadata={"min": 1})
    num_classes: int | None = field(default=None, metadata={"min": 2})
    pretrained: bool = False
    checkpoint: str | None = None
    drop_path_rate: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    block: Literal["pre_ln", "op"] = "pre_ln"
    op: OPConfig = field(default_factory=OPConfig)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """Train-time augmentation (applied on tensors, batched-friendly)."""

    random_crop: int = field(default=0, metadata={"min": 0})  # random shift by up to this many pixels
    hflip: bool = False
    random_erasing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    rotate: float = field(default=0.0, metadata={"min": 0.0, "max": 180.0})  # max degrees
    scale: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})  # zoom in [1-s, 1+s]


@dataclass
class DataConfig:
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"] = "digits"
    root: str = "data"
    download: bool = False
    val_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True, "max_exclusive": True})
    split_seed: int = 0
    # mnist, fashion_mnist, cifar: validation images held out of the official training split (class-stratified,
    # split_seed; at most a fifth of it); the official test split is evaluated once, at the end of a run
    val_size: int = field(default=5000, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1, "max": MAX_BATCH_SIZE})
    eval_batch_size: int = field(default=256, metadata={"min": 1, "max": MAX_BATCH_SIZE})
    num_workers: int = field(default=0, metadata={"min": 0})
    normalize: bool = True
    limit_train: int | None = field(default=None, metadata={"min": 2})
    # imagefolder: memory decodes every image once (uint8) and augments on the fly; none decodes each epoch
    cache: Literal["none", "memory"] = "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)  # timm's PIL transforms (off by default)

    def check(self, prefix: str) -> None:
        if self.cache == "memory" and self.name != "imagefolder":
            raise ConfigError(f"{prefix}.cache: memory is for imagefolder ({self.name} is held in memory already)")
        a = self.augment
        on = [k for k in ("random_crop", "hflip", "random_erasing", "rotate", "scale") if getattr(a, k)]
        if self.transform.enabled and on:
            raise ConfigError(f"{prefix}.augment.{on[0]}: the tensor augmenter does not combine with "
                              f"{prefix}.transform (timm); use its options (scale, hflip, re_prob, auto_augment)")


@dataclass
class OptimConfig:
    # any name of timm.optim.list_optimizers() (lion, lamb, adan, nadamw, ...; built by create_optimizer_v2),
    # or soap | shampoo (pytorch-optimizer)
    name: str = "adamw"
    lr: float = field(default=1e-3, metadata={"min": 0.0, "min_exclusive": True})
    weight_decay: float = field(default=0.05, metadata={"min": 0.0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = field(default=1e-8, metadata={"min": 0.0, "min_exclusive": True})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    nesterov: bool = False
    # layer-wise lr decay (BEiT/DeiT-III fine-tuning): groups from timm.optim.create_optimizer_v2, lr x decay^depth
    layer_decay: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    # lr schedule after train.warmup_epochs (timm.scheduler); cosine/poly/tanh decay to train.min_lr by
    # train.epochs - cooldown_epochs, then hold it; step: x decay_rate every decay_epochs; multistep: x decay_rate
    # at each of decay_milestones; plateau: x decay_rate after patience_epochs evaluations without a better val_acc
    sched: Literal["cosine", "step", "multistep", "plateau", "poly", "tanh"] = "cosine"
    cooldown_epochs: float = field(default=0.0, metadata={"min": 0.0})
    decay_epochs: float = field(default=30.0, metadata={"min": 0.0, "min_exclusive": True})
    decay_milestones: list[float] = field(default_factory=lambda: [30.0, 60.0])
    decay_rate: float = field(default=0.1, metadata={"min": 0.0, "min_exclusive": True})  # poly: the power
    patience_epochs: int = field(default=10, metadata={"min": 0})
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, prefix: str) -> None:
        if self.name not in ("adamw", "sgd", "soap", "shampoo"):  # others: timm's registry (imports torch)
            from lotus.optim import check_optimizer_name

            check_optimizer_name(self.name, f"{prefix}.name")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: expected two floats in [0, 1), got {self.betas!r}")
        if any(b <= a for a, b in zip(self.decay_milestones, self.decay_milestones[1:])) or \
                any(m <= 0 for m in self.decay_milestones):
            raise ConfigError(f"{prefix}.decay_milestones: expected increasing epochs > 0, got {self.decay_milestones!r}")


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata={"min": 1})
    warmup_epochs: float = field(default=1.0, metadata={"min": 0.0})  # longer than training: lr ramps throughout
    min_lr: float = field(default=1e-5, metadata={"min": 0.0})
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    grad_clip: float | None = field(default=1.0, metadata={"min": 0.0, "min_exclusive": True})
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # fp16: CUDA only, with a GradScaler
    deterministic: bool = True
    # auto (CPU): the fastest thread count for this model, timed at start and re-checked when step time jumps
    # (not bit-reproducible across machine loads); an int pins it; null keeps torch's default
    threads: int | Literal["auto"] | None = field(default="auto", metadata={"min": 1})
    eval_every: int = field(default=1, metadata={"min": 1})
    max_steps: int | None = field(default=None, metadata={"min": 1})
    # steps between checks that the loss stayed finite (each check is one host sync; epochs end with one too)
    finite_check_every: int = field(default=100, metadata={"min": 1})
    accumulate_steps: int = field(default=1, metadata={"min": 1})  # micro-batches per optimiser step
    clip_mode: Literal["norm", "value", "agc"] = "norm"  # how grad_clip applies (timm.utils.dispatch_clip_grad)
    loss: Literal["ce", "bce"] = "ce"  # bce: binary cross-entropy on (smoothed / mixed) one-hot targets
    bce_target_thresh: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0})
    compile: bool = False  # torch.compile the model (inductor; CPU needs a C++ compiler)
    log_every_n_steps: int = field(default=0, metadata={"min": 0})  # step records in metrics.jsonl (0: off)

@dataclass
class OutputConfig:
    dir: str | None = None  # default: runs/<config name>
    save_best: bool = True
    save_last: bool = True
    report: bool = True
    tensorboard: bool = False  # also write epoch/step scalars to RUN_DIR/tensorboard (pip install tensorboard)
    # also keep the N best epochs' weights (by val_acc) as checkpoint-<epoch>.safetensors + checkpoints.json
    keep_checkpoints: int = field(default=0, metadata={"min": 0})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    outliers: OutliersConfig = field(default_factory=OutliersConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lotus: ScheduleConfig = field(default_factory=ScheduleConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    name: str = "run"
    # what the user gave (file, ``base:`` merged, plus ``--set`` overrides): what ``save_config`` writes
    source: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def check(self, prefix: str) -> None:
        """Cross-section rules: the feature sections must fit the run's schedule (built, then dropped:
        the Trainer builds its own; the config is never changed)."""
        check_run_name(self.name, f"{prefix}name" if prefix else "name")  # runs/<name>-<time>: one folder name
        Schedule(self)
        if self.optim.sched in ("cosine", "poly", "tanh") and \
                self.optim.cooldown_epochs >= self.train.epochs - self.train.warmup_epochs > 0:
            raise ConfigError(f"optim.cooldown_epochs: {self.optim.cooldown_epochs} leaves no decay between the "
                              f"warm-up ({self.train.warmup_epochs}) and train.epochs ({self.train.epochs})")
        if self.resolution.enabled and not self.model.kwargs.get("dynamic_img_size"):
            raise ConfigError("resolution.enabled: needs model.kwargs.dynamic_img_size: true (the ViT then takes "
                              "smaller images and interpolates its position embedding)")
        if self.ema.enabled and self.pruning.masks_enabled:
            raise ConfigError("ema.enabled: not supported together with pruning masks (pruning.method "
                              f"{self.pruning.method!r}) yet; structured thinning works with EMA")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict, returning a new dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE such as optim.lr=1e-3")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item}: expected a dotted key such as train.epochs")
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """Validate a raw dict (plus overrides) into a :class:`Config`."""
    source = apply_overrides(data or {}, overrides or [])
    cfg = validate(Config, source, "")
    check_compat(cfg)  # feature combinations that cannot run data-parallel
    cfg.source = source
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict:
    """Read a config file, resolving ``base: other.yaml`` (relative to the file) recursively."""
    if not os.path.isfile(path):
        where = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path to another config file, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    if os.path.abspath(base_path) in chain:
        raise ConfigError(f"{path}: base: {base} includes itself")
    return _deep_merge(_read_yaml(base_path, chain + (os.path.abspath(path),)), data)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read and validate a YAML config file.

    A file may start from another with ``base: other.yaml`` (path relative to the file): its sections are
    merged key by key over the base's, so variants state only what they change.
    """
    path = os.fspath(path)
    data = _read_yaml(path)
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return config_from_dict(data, overrides)


def config_to_dict(cfg: Config) -> dict:
    """The full config as plain data (every key, defaults filled in)."""
    return to_dict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write what the user gave (``cfg.source``; the full config when it was built in code), so a resumed
    run re-reads the same choices and takes defaults from the code it runs with."""
    from lotus.checkpoint import atomic_write_text  # imports torch: only when a run writes its config

    atomic_write_text(path, yaml.safe_dump(cfg.source or config_to_dict(cfg), sort_keys=False))
