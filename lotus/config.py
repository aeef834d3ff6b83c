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
from lotus.features.schedule.phases import Schedule
from lotus.features.tickets.config import TicketsConfig
from lotus.parallel.compat import check_compat
from lotus.parallel.config import ParallelConfig
from lotus.safe_io import atomic_write_text, check_run_name
from lotus.schema import to_dict, validate
from lotus.transform_config import TransformConfig

__all__ = [
    "Config",
    "ModelConfig",
    "DataConfig",
    "AugmentConfig",
    "TransformConfig",
    "OptimConfig",
    "TrainConfig",
    "OutputConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "save_config",
]


MAX_IMG_SIZE = 4096  # pixels a side: larger position embeddings / activations do not fit any machine
MAX_BATCH_SIZE = 1 << 20


@dataclass
class ModelConfig:
    """Which timm model to build. Unset sizes come from the data (channels, classes) or the model."""

    name: str = "lotus_vit_tiny"
    """Any timm model name, or a registered Lotus ViT: lotus_vit_micro (16 px), lotus_vit_tiny, lotus_vit_small (32
    px)."""
    img_size: int | None = field(default=None, metadata={"min": 1, "max": MAX_IMG_SIZE})
    """Input side in pixels; default: the data's image size (or the model's own)."""
    patch_size: int | None = field(default=None, metadata={"min": 1})
    """ViT patch side in pixels, passed to timm; default: the model's own."""
    in_chans: int | None = field(default=None, metadata={"min": 1})
    """Input channels; default: the data's channel count."""
    num_classes: int | None = field(default=None, metadata={"min": 2})
    """Classifier outputs; default: the data's class count."""
    pretrained: bool = False
    """Load timm's published weights (downloads them; offline, pass model.checkpoint instead)."""
    checkpoint: str | None = None
    """Local weights to start from: a .safetensors file or a state dict read with torch.load(weights_only=True)."""
    drop_path_rate: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    """Stochastic depth rate, passed to timm."""
    block: Literal["pre_ln", "op"] = "pre_ln"
    """Transformer block: pre_ln (timm's) or op (the Outlier-Protected block, set up by model.op)."""
    op: OPConfig = field(default_factory=OPConfig)
    """Settings of the Outlier-Protected block, used when model.block is op."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for timm.create_model (e.g. dynamic_img_size: true)."""


@dataclass
class AugmentConfig:
    """Train-time augmentation (applied on tensors, batched-friendly)."""

    random_crop: int = field(default=0, metadata={"min": 0})
    """Random shift by up to this many pixels."""
    hflip: bool = False
    """Random horizontal flip."""
    random_erasing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Probability of erasing a random rectangle of each image."""
    rotate: float = field(default=0.0, metadata={"min": 0.0, "max": 180.0})
    """Random rotation by up to this many degrees."""
    scale: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})
    """Random zoom by a factor in [1 - scale, 1 + scale]."""


@dataclass
class DataConfig:
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"] = "digits"
    """Dataset: digits (scikit-learn's, bundled), mnist, fashion_mnist, cifar10, cifar100, or imagefolder (data.root
    with train/ and val/ class folders)."""
    root: str = "data"
    """Folder holding the dataset files (fashion_mnist from apt-get install dataset-fashion-mnist:
    /usr/share/datasets/fashion-mnist)."""
    download: bool = False
    """Let torchvision download mnist, fashion_mnist or cifar into data.root when the files are missing."""
    val_fraction: float = field(
        default=0.2, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True, "max_exclusive": True}
    )
    """digits: share of the samples in the validation split (class-stratified, split_seed)."""
    split_seed: int = 0
    """Seed of the train/validation split (and of data.limit_train's subset)."""
    val_size: int = field(default=5000, metadata={"min": 1})
    """mnist, fashion_mnist, cifar: validation images held out of the official training split (class-stratified, at
    most a fifth of it); the official test split is evaluated once, at the end of a run."""
    batch_size: int = field(default=64, metadata={"min": 1, "max": MAX_BATCH_SIZE})
    """Training batch size (per process under torchrun)."""
    eval_batch_size: int = field(default=256, metadata={"min": 1, "max": MAX_BATCH_SIZE})
    """Evaluation batch size."""
    num_workers: int = field(default=0, metadata={"min": 0})
    """DataLoader worker processes that decode and transform images (0: in the training process)."""
    normalize: bool = True
    """Normalise inputs with the training split's mean/std (imagefolder: 0.5/0.5; data.transform.mean/std win)."""
    limit_train: int | None = field(default=None, metadata={"min": 2})
    """Train on a class-stratified subset of this many training images (in-memory datasets only)."""
    cache: Literal["none", "memory"] = "none"
    """imagefolder: memory decodes every image once (uint8) and augments on the fly; none decodes each epoch."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """The batched tensor augmenter of the in-memory datasets (all off by default)."""
    transform: TransformConfig = field(default_factory=TransformConfig)
    """timm's per-sample PIL transforms (create_transform); off by default, replaces data.augment."""

    def check(self, prefix: str) -> None:
        if self.cache == "memory" and self.name != "imagefolder":
            raise ConfigError(f"{prefix}.cache: memory is for imagefolder ({self.name} is held in memory already)")
        a = self.augment
        on = [k for k in ("random_crop", "hflip", "random_erasing", "rotate", "scale") if getattr(a, k)]
        if self.transform.enabled and on:
            raise ConfigError(
                f"{prefix}.augment.{on[0]}: the tensor augmenter does not combine with "
                f"{prefix}.transform (timm); use its options (scale, hflip, re_prob, auto_augment)"
            )


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimiser: any name of timm.optim.list_optimizers() (adamw, lion, lamb, adan, nadamw, lookahead_...), or soap
    / shampoo (pytorch-optimizer)."""
    lr: float = field(default=1e-3, metadata={"min": 0.0, "min_exclusive": True})
    """Peak learning rate (reached after train.warmup_epochs)."""
    weight_decay: float = field(default=0.05, metadata={"min": 0.0})
    """Decoupled weight decay; never applied to biases, norms and gains."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam-style betas, two floats in [0, 1) (dropped for optimisers without them)."""
    eps: float = field(default=1e-8, metadata={"min": 0.0, "min_exclusive": True})
    """Optimiser epsilon."""
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    """Momentum of SGD-style optimisers."""
    nesterov: bool = False
    """Nesterov momentum, for optimisers that take it."""
    layer_decay: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """Layer-wise lr decay (BEiT/DeiT-III fine-tuning): lr x layer_decay^depth, groups from timm's
    param_groups_layer_decay; null: off."""
    sched: Literal["cosine", "step", "multistep", "plateau", "poly", "tanh"] = "cosine"
    """lr schedule after the warm-up (timm.scheduler): cosine/poly/tanh decay to train.min_lr, step, multistep, or
    plateau (on val_acc)."""
    cooldown_epochs: float = field(default=0.0, metadata={"min": 0.0})
    """cosine/poly/tanh: reach train.min_lr this many epochs before the end and hold it."""
    decay_epochs: float = field(default=30.0, metadata={"min": 0.0, "min_exclusive": True})
    """step: multiply the lr by decay_rate every this many epochs."""
    decay_milestones: list[float] = field(default_factory=lambda: [30.0, 60.0])
    """multistep: multiply the lr by decay_rate at each of these epochs (increasing, timm's 1-based convention)."""
    decay_rate: float = field(default=0.1, metadata={"min": 0.0, "min_exclusive": True})
    """step/multistep/plateau: lr factor per decay; poly: the power."""
    patience_epochs: int = field(default=10, metadata={"min": 0})
    """plateau: evaluations without a better val_acc before the lr is multiplied by decay_rate."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the optimiser's constructor."""

    def check(self, prefix: str) -> None:
        if self.name not in ("adamw", "sgd", "soap", "shampoo"):  # others: timm's registry (imports torch)
            from lotus.optim import check_optimizer_name

            check_optimizer_name(self.name, f"{prefix}.name")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: expected two floats in [0, 1), got {self.betas!r}")
        if any(b <= a for a, b in zip(self.decay_milestones, self.decay_milestones[1:])) or any(
            m <= 0 for m in self.decay_milestones
        ):
            raise ConfigError(
                f"{prefix}.decay_milestones: expected increasing epochs > 0, got {self.decay_milestones!r}"
            )


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata={"min": 1})
    """Training epochs."""
    warmup_epochs: float = field(default=1.0, metadata={"min": 0.0})
    """Linear lr warm-up, in (fractional) epochs; longer than training: the lr ramps throughout."""
    min_lr: float = field(default=1e-5, metadata={"min": 0.0})
    """The lr the decay ends at."""
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    """Label smoothing of the targets (mixed targets too)."""
    grad_clip: float | None = field(default=1.0, metadata={"min": 0.0, "min_exclusive": True})
    """Gradient clipping threshold (see clip_mode); null: off."""
    seed: int = 0
    """Seed of the model init, data order and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision: auto = bf16 autocast on CUDA that supports it; fp16 adds a GradScaler (CUDA only); off."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms (warn only)."""
    threads: int | Literal["auto"] | None = field(default="auto", metadata={"min": 1})
    """CPU threads: auto = the fastest count for this model, timed on the run's first steps and re-tuned when steps
    stay slower (not bit-reproducible across machine loads); an int pins it; null keeps torch's default."""
    eval_every: int = field(default=1, metadata={"min": 1})
    """Evaluate every N epochs (and always after the last)."""
    max_steps: int | None = field(default=None, metadata={"min": 1})
    """Stop after this many optimiser steps; null: train all epochs."""
    finite_check_every: int = field(default=100, metadata={"min": 1})
    """Steps between checks that the loss stayed finite (each is one host sync; every epoch ends with one too)."""
    accumulate_steps: int = field(default=1, metadata={"min": 1})
    """Micro-batches per optimiser step (gradient accumulation)."""
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    """How grad_clip applies: norm, value or agc (timm's dispatch_clip_grad)."""
    loss: Literal["ce", "bce"] = "ce"
    """ce: cross-entropy; bce: binary cross-entropy on (smoothed / mixed) one-hot targets."""
    bce_target_thresh: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0})
    """bce: binarise targets at this threshold; null: soft targets."""
    compile: bool = False
    """torch.compile the model (inductor; on CPU it needs a C++ compiler)."""
    log_every_n_steps: int = field(default=0, metadata={"min": 0})
    """Write a step record (loss, lr, img/s) to metrics.jsonl every N steps; 0: off."""


@dataclass
class OutputConfig:
    dir: str | None = None
    """Run directory; default: runs/<name>-<time> (--out wins)."""
    save_best: bool = True
    """Write best.safetensors (the best val_acc so far)."""
    save_last: bool = True
    """Write last.safetensors at each checkpoint."""
    report: bool = True
    """Write report.md and curves.png at the end of the run."""
    tensorboard: bool = False
    """Also write epoch/step scalars to RUN_DIR/tensorboard (pip install tensorboard)."""
    wandb: Literal["off", "offline", "online"] = "off"
    """Also log epoch/step scalars to Weights & Biases (pip install wandb): offline writes RUN_DIR/wandb for a later
    wandb sync; a resumed run continues the same W&B run."""
    wandb_project: str = "lotus"
    """W&B project of output.wandb."""
    keep_checkpoints: int = field(default=0, metadata={"min": 0})
    """Also keep the N best epochs' weights by val_acc (checkpoint-<epoch>.safetensors, checkpoints.json); 0: off."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (any timm model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset, its splits, augmentation and loading."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser and its lr schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """What a run writes."""
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    """Data tickets: an offline ticket file, dynamic data pruning, patch tickets, random subsets."""
    pruning: PruningConfig = field(default_factory=PruningConfig)
    """Sparsity masks and structured thinning during training (off by default)."""
    outliers: OutliersConfig = field(default_factory=OutliersConfig)
    """Outlier-feature monitoring during training (off by default)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism (DDP, FSDP2) and per-block memory optimisations (off by default)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The LOTUS schedule: dense warm-up, a reduced phase, a full-data anneal; fixed or auto (off by default)."""
    mixup: MixupConfig = field(default_factory=MixupConfig)
    """timm's Mixup / CutMix (off by default)."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    """timm's ModelEmaV3 weight averaging (off by default)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Soft-label distillation from a frozen teacher (off by default)."""
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    """Progressive resolution: early epochs on smaller images (off by default)."""
    name: str = "run"
    """Run name: one folder name (no /, \\, '..'; at most 128 bytes); default: the config file's name."""
    # what the user gave (file, ``base:`` merged, plus ``--set`` overrides): what ``save_config`` writes
    source: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def check(self, prefix: str) -> None:
        """Cross-section rules: the feature sections must fit the run's schedule (built, then dropped:
        the Trainer builds its own; the config is never changed)."""
        check_run_name(self.name, f"{prefix}name" if prefix else "name")  # runs/<name>-<time>: one folder name
        Schedule(self)
        if (
            self.optim.sched in ("cosine", "poly", "tanh")
            and self.optim.cooldown_epochs >= self.train.epochs - self.train.warmup_epochs > 0
        ):
            raise ConfigError(
                f"optim.cooldown_epochs: {self.optim.cooldown_epochs} leaves no decay between the "
                f"warm-up ({self.train.warmup_epochs}) and train.epochs ({self.train.epochs})"
            )
        if self.resolution.enabled and not self.model.kwargs.get("dynamic_img_size"):
            raise ConfigError(
                "resolution.enabled: needs model.kwargs.dynamic_img_size: true (the ViT then takes "
                "smaller images and interpolates its position embedding)"
            )
        if self.ema.enabled and self.pruning.masks_enabled:
            raise ConfigError(
                "ema.enabled: not supported together with pruning masks (pruning.method "
                f"{self.pruning.method!r}) yet; structured thinning works with EMA"
            )


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
    if isinstance(source, dict) and "lotus" in source:
        raise ConfigError(
            "lotus: this section is now called schedule: (and lotus.schedule: auto|fixed is schedule.mode); "
            "rename it in the config or --set"
        )
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
    atomic_write_text(path, yaml.safe_dump(cfg.source or config_to_dict(cfg), sort_keys=False))
