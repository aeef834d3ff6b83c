"""The Lotus training loop: config in, run directory out.

Features plug in through :class:`Callback` objects (ticket selection, pruning, outlier metrics, the
LOTUS schedule) without editing the loop. The loop itself is plain PyTorch: one forward, per-sample
loss, backward, clip, step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lotus.checkpoint import load_state, save_state, save_weights
from lotus.config import Config, config_to_dict, load_config, save_config
from lotus.data import Augmenter, DataBundle, batches, build_datasets
from lotus.errors import LotusError
from lotus.models import create_model, unwrap
from lotus.optim import CosineSchedule, build_optimizer
from lotus.parallel.runtime import DistInfo

__all__ = ["Callback", "Trainer", "train", "DistInfo", "resolve_img_size", "default_forward"]


class Callback:
    """Hook points of the training loop. Override what you need; every method is optional.

    Callbacks run in ascending ``order``. ``state_dict`` must hold only tensors, numbers, strings,
    lists and dicts (it is saved with the training state and loaded with ``weights_only=True``).
    """

    order: int = 0

    def on_fit_start(self, trainer: "Trainer") -> None:
        """After model, optimiser and (on resume) the restored state are ready."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """May set ``trainer.subset`` (train indices) or ``trainer.sampler`` (iterable of indices)."""

    def transform_batch(self, trainer: "Trainer", images: torch.Tensor, labels: torch.Tensor,
                        index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return images, labels, index

    def per_sample_loss(self, trainer: "Trainer", loss: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Re-weight the per-sample loss vector (e.g. InfoBatch); sees the loss before averaging."""
        return loss

    def on_after_backward(self, trainer: "Trainer") -> None:
        """Gradients are available (e.g. mask them)."""

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        """After ``optimizer.step()`` (e.g. re-apply masks, prune on a schedule)."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        """``metrics`` is written to metrics.jsonl after all callbacks ran: add keys to log them."""

    def on_fit_end(self, trainer: "Trainer", summary: dict) -> None:
        """``summary`` is written to summary.json after all callbacks ran."""

    def on_load_checkpoint(self, trainer: "Trainer", state: dict) -> None:
        """On resume, before the model weights are loaded: rebuild shapes/parametrizations here."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def default_forward(model: nn.Module, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return model(images)


def resolve_img_size(cfg: Config) -> int:
    """Model input size: ``model.img_size`` or the timm model's own default."""
    if cfg.model.img_size:
        return cfg.model.img_size
    import timm

    if timm.is_model(cfg.model.name):
        pcfg = timm.models.get_pretrained_cfg(cfg.model.name)
        size = getattr(pcfg, "input_size", None) if pcfg is not None else None
        if size:
            return int(size[-1])
    return 224


def _feature_callbacks(cfg: Config) -> list[Callback]:
    from lotus import outliers, prune, schedule, tickets, tickets_online

    cbs: list[Callback] = []
    for mod in (tickets, tickets_online, prune, outliers, schedule):
        cbs.extend(mod.callbacks(cfg))
    return cbs


def _init_distributed(cfg: Config) -> DistInfo:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    from lotus.parallel.runtime import init_distributed

    return init_distributed(device=cfg.train.device, backend=cfg.parallel.backend)


class Trainer:
    """Runs one training job described by a :class:`~lotus.config.Config`.

    Args:
        cfg: the validated config.
        callbacks: extra callbacks besides those the config's feature sections create.
        run_dir: output folder (default ``output.dir`` or ``runs/<name>-<time>``).
        resume: continue the run in ``run_dir`` from its ``state.pt``.
        quiet: no progress bar and no printed epoch lines.
    """

    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None, run_dir: str | None = None,
                 resume: bool = False, quiet: bool = False, write: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.quiet = quiet
        self.write = write
        self.dist = _init_distributed(cfg)
        self.run_dir = run_dir or cfg.output.dir or os.path.join(
            "runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.callbacks = sorted(list(callbacks or []) + _feature_callbacks(cfg), key=lambda c: c.order)
        self.forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = default_forward
        self.subset: np.ndarray | None = None
        self.sampler: Any = None
        self.step = 0
        self.epoch = 0
        self.samples_seen = 0
        self.train_flops = 0.0
        self.wall = 0.0
        self.best_acc = -1.0
        self.events: list[dict] = []
        self._log_file = None

    # ----------------------------------------------------------------- setup
    def _setup_runtime(self) -> None:
        t = self.cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.device == "cuda" and not torch.cuda.is_available():
            raise LotusError("train.device: cuda requested but no CUDA device is available")
        if self.dist.world_size > 1:  # torchrun chose this rank's device
            self.device = self.dist.device
        else:
            self.device = torch.device("cuda" if t.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        if t.amp == "bf16" or (t.amp == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        seed = t.seed + self.dist.rank * 0  # same init on every rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = False
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    def _setup_data(self) -> None:
        img_size = resolve_img_size(self.cfg)
        self.data: DataBundle = build_datasets(self.cfg.data, img_size, self.cfg.model.in_chans)
        self.train_set, self.val_set = self.data.train, self.data.val
        self.labels_train = self.data.labels_train
        self.augment = Augmenter(self.cfg.data.augment, self.cfg.train.seed)

    def _setup_model(self, state: dict | None) -> None:
        d = self.data
        model = create_model(self.cfg.model, d.num_classes, d.in_chans, d.img_size)
        self.model = model.to(self.device)
        self.unwrapped_model = self.model
        if state is not None:
            for cb in self.callbacks:
                cb.on_load_checkpoint(self, state)
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise LotusError(f"resume: the saved model does not fit this config (changed model settings?): "
                                 f"{first}") from None
        if self.dist.world_size > 1 or self.cfg.parallel.mode != "none":
            from lotus.parallel.apply import parallelize

            self.model = parallelize(
                self.model, self.cfg.parallel, self.dist, batch_size=self.cfg.data.batch_size,
                build_optimizer=lambda m: build_optimizer(self.cfg.optim, m),
                autocast_dtype=None if self.autocast is contextlib.nullcontext else torch.bfloat16)

    def rebuild_optimizer(self, state_transform: Callable[[torch.optim.Optimizer, torch.optim.Optimizer], None] | None = None) -> None:
        """Build a new optimiser over the current parameters (e.g. after structured thinning), keeping
        the position in the lr schedule; ``state_transform(old, new)`` may carry optimiser state over."""
        old = getattr(self, "optimizer", None)
        self.optimizer = build_optimizer(self.cfg.optim, self.model)
        if old is not None and state_transform is not None:
            state_transform(old, self.optimizer)
        position = self.scheduler.position if hasattr(self, "scheduler") else 0.0
        t = self.cfg.train
        self.scheduler = CosineSchedule(self.optimizer, self.cfg.optim.lr, t.min_lr, t.warmup_epochs, t.epochs)
        self.scheduler.set_position(position)

    # ------------------------------------------------------------- logging
    def _open_log(self) -> None:
        if not (self.write and self.dist.is_main):
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self._log_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a")

    def _write_record(self, record: dict) -> None:
        if self._log_file is not None:
            self._log_file.write(json.dumps(record) + "\n")
            self._log_file.flush()

    def log(self, event: str, **fields: Any) -> None:
        """Record an event (what, when, how long, result) in metrics.jsonl and the run summary."""
        rec = {"type": "event", "event": event, "epoch": self.epoch, "step": self.step,
               "wall_s": round(self._wall_now(), 4), **fields}
        self.events.append(rec)
        self._write_record(rec)
        self._print(f"[{event}] " + ", ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, (list, dict))))

    def _print(self, text: str) -> None:
        if not self.quiet and self.dist.is_main:
            from tqdm import tqdm

            tqdm.write(text)

    def _wall_now(self) -> float:
        start = getattr(self, "_segment_start", None)
        return self.wall + (time.perf_counter() - start if start is not None else 0.0)

    # ----------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(self, model: nn.Module | None = None, dataset: Any = None) -> dict:
        """Top-1 accuracy and mean loss on the validation set (sharded and summed across ranks)."""
        model = model or self.model
        dataset = dataset or self.val_set
        was_training = model.training
        model.eval()
        n = len(dataset)
        w = self.dist.world_size
        # Same number of batches on every rank (FSDP2 forwards are collective): pad with repeats, mask them out.
        pos = np.arange(n + (-n) % w)[self.dist.rank :: w]
        idx = pos % n
        offset = 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for x, y, _ in batches(dataset, idx, self.cfg.data.eval_batch_size, self.cfg.data.num_workers):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                logits = model(x)
            valid = torch.as_tensor(pos[offset : offset + len(y)] < n, device=logits.device)
            offset += len(y)
            loss_sum += (F.cross_entropy(logits.float(), y, reduction="none") * valid).sum().double().cpu()
            correct += ((logits.argmax(-1) == y) & valid).sum().double().cpu()
            count += valid.sum().double().cpu()
        if self.dist.world_size > 1:
            import torch.distributed as dist

            t = torch.stack([loss_sum, correct, count]).to(self.device)
            dist.all_reduce(t)
            loss_sum, correct, count = t.cpu()
        model.train(was_training)
        return {"val_loss": float(loss_sum / count), "val_acc": float(correct / count)}

    # ------------------------------------------------------------ epoch order
    def _epoch_indices(self, epoch: int) -> np.ndarray:
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            order = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
        else:
            base = np.arange(len(self.train_set)) if self.subset is None else np.asarray(self.subset, dtype=np.int64)
            g = torch.Generator().manual_seed(self.cfg.train.seed * 100003 + epoch)
            order = base[torch.randperm(len(base), generator=g).numpy()]
        if self.dist.world_size > 1:  # pad to a multiple of world size, then stripe across ranks
            w = self.dist.world_size
            pad = (-len(order)) % w
            if pad:
                order = np.concatenate([order, order[:pad]])
            order = order[self.dist.rank :: w]
        return order

    def _measure_flops(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> float:
        """Forward FLOPs per sample of the current training forward (x3 for forward+backward)."""
        from torch.utils.flop_counter import FlopCounterMode

        n = min(2, len(images))
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                self.forward(self.model, images[:n], index[:n])
            return fc.get_total_flops() / n
        except Exception:  # noqa: BLE001 - FLOP counting is informational only
            return float("nan")
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict:
        """Train for ``train.epochs`` (or until ``train.max_steps``); returns the summary dict."""
        cfg = self.cfg
        state = None
        if self.resume:
            state = load_state(os.path.join(self.run_dir, "state.pt"))
        elif self.write and self.dist.is_main and os.path.exists(os.path.join(self.run_dir, "metrics.jsonl")):
            raise LotusError(f"output.dir: {self.run_dir} already holds a run; resume it with --resume "
                             f"{self.run_dir} or choose another --out")
        self._setup_runtime()
        self._setup_data()
        self._setup_model(state)
        self.rebuild_optimizer()
        start_epoch = 0
        if state is not None:
            self._restore(state)
            start_epoch = self.epoch
            capped = cfg.train.max_steps is not None and self.step >= cfg.train.max_steps
            if start_epoch >= cfg.train.epochs or capped:
                raise LotusError(f"resume: {self.run_dir} already finished ({self.epoch} epochs, {self.step} steps); "
                                 "pass --set train.epochs=N (or train.max_steps) with a larger value to continue")
        self._open_log()
        if self.write and self.dist.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        for cb in self.callbacks:
            cb.on_fit_start(self)
        steps_cap = cfg.train.max_steps
        show_bar = not self.quiet and self.dist.is_main and sys.stdout.isatty()
        last_metrics: dict = {}
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                if steps_cap is not None and self.step >= steps_cap:
                    break
                self.epoch = epoch
                self._segment_start = time.perf_counter()
                for cb in self.callbacks:
                    cb.on_epoch_start(self, epoch)
                last_metrics = self._train_epoch(epoch, show_bar, steps_cap)
                self.wall = self._wall_now()
                self._segment_start = None
                stopping = steps_cap is not None and self.step >= steps_cap
                if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs or stopping:
                    last_metrics.update(self.evaluate())
                last_metrics["wall_s"] = round(self.wall, 4)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, last_metrics)
                self.epoch = epoch + 1
                self._write_record(last_metrics)
                self._print(self._epoch_line(last_metrics))
                self._checkpoint(last_metrics)
            summary = self._summary(last_metrics)
            for cb in self.callbacks:
                cb.on_fit_end(self, summary)  # may still log events
            summary["events"] = self.events
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        if self.write and self.dist.is_main:
            from lotus.checkpoint import atomic_write_text

            atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))
            if self.cfg.output.report:
                from lotus.report import write_report

                write_report(self.run_dir)
        return summary

    def _train_epoch(self, epoch: int, show_bar: bool, steps_cap: int | None) -> dict:
        cfg = self.cfg
        order = self._epoch_indices(epoch)
        bs = cfg.data.batch_size
        n_batches = max(1, math.ceil(len(order) / bs))
        self.steps_per_epoch = n_batches
        model, opt = self.model, self.optimizer
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        seen = 0
        epoch_flops = None
        t0 = time.perf_counter()
        it = batches(self.train_set, order, bs, cfg.data.num_workers)
        if show_bar:
            from tqdm import tqdm

            it = tqdm(it, total=n_batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True)
        for b, (x, y, idx) in enumerate(it):
            if steps_cap is not None and self.step >= steps_cap:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.augment.active:
                x = self.augment(x)
            for cb in self.callbacks:
                x, y, idx = cb.transform_batch(self, x, y, idx)
            if epoch_flops is None:
                epoch_flops = self._measure_flops(x, y, idx)
            self.scheduler.set_position(epoch + b / n_batches)
            with self.autocast():
                logits = self.forward(model, x, idx)
            loss_vec = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=cfg.train.label_smoothing)
            for cb in self.callbacks:
                loss_vec = cb.per_sample_loss(self, loss_vec, idx)
            loss = loss_vec.mean()
            finite = torch.isfinite(loss.detach())
            if self.dist.world_size > 1:  # every rank stops together (no rank left waiting in a collective)
                import torch.distributed as dist

                flag = finite.to(torch.int32).reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = flag[0].bool()
            if not finite:
                raise LotusError(
                    f"train: loss became {loss.item()} at step {self.step + 1} (epoch {epoch + 1}); stopped, the last "
                    f"good checkpoint is kept in {self.run_dir} (try a lower optim.lr or train.grad_clip)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for cb in self.callbacks:
                cb.on_after_backward(self)
            if cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            self.step += 1
            n = len(y)
            seen += n
            loss_sum += loss.detach().double().cpu() * n
            for cb in self.callbacks:
                cb.on_step_end(self, self.step)
            model, opt = self.model, self.optimizer  # a callback may have replaced them
        dt = time.perf_counter() - t0
        seen_all = seen * self.dist.world_size
        self.samples_seen += seen_all
        flops = (epoch_flops or 0.0) * 3 * seen_all
        if not math.isnan(flops):
            self.train_flops += flops
        return {"type": "epoch", "epoch": epoch + 1, "step": self.step, "samples_seen": self.samples_seen,
                "train_loss": float(loss_sum / max(seen, 1)), "lr": self.optimizer.param_groups[0]["lr"],
                "throughput": round(seen_all / dt, 2) if dt > 0 else None, "epoch_samples": seen_all,
                "train_flops": self.train_flops}

    def _epoch_line(self, m: dict) -> str:
        parts = [f"epoch {m['epoch']}/{self.cfg.train.epochs}", f"loss {m['train_loss']:.4f}"]
        if "val_acc" in m:
            parts += [f"val_loss {m['val_loss']:.4f}", f"val_acc {m['val_acc'] * 100:.2f}%"]
        parts += [f"{m['throughput']} img/s", f"{m['wall_s']:.1f}s"]
        return "  ".join(parts)

    # ---------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        from lotus.parallel.checkpoint import get_full_state

        model_sd, optim_sd = get_full_state(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "step": self.step, "samples_seen": self.samples_seen,
            "train_flops": self.train_flops, "wall": self.wall, "best_acc": self.best_acc,
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_numpy": _numpy_state(), "rng_python": _python_state(),
            "rng_augment": self.augment.gen.get_state(),
            "subset": None if self.subset is None else torch.as_tensor(np.asarray(self.subset)),
            "callbacks": {key: cb.state_dict() for key, cb in self._callback_keys()},
            "events": self.events,
        }

    def _restore(self, state: dict) -> None:
        from lotus.parallel.checkpoint import set_full_state

        set_full_state(self.model, self.optimizer, None, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for k in ("epoch", "step", "samples_seen", "train_flops", "wall", "best_acc"):
            setattr(self, k, state[k])
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        _set_numpy_state(state["rng_numpy"])
        _set_python_state(state["rng_python"])
        self.augment.gen.set_state(state["rng_augment"])
        self.subset = None if state.get("subset") is None else state["subset"].numpy()
        self.events = list(state.get("events", []))
        saved = dict(state.get("callbacks", {}))
        for key, cb in self._callback_keys():
            if key in saved:
                cb.load_state_dict(saved.pop(key))
        dropped = [k for k, v in saved.items() if v]
        if dropped:
            raise LotusError(f"resume: the run was saved with feature state ({', '.join(dropped)}) that this config "
                             "does not use; resume with the run's own config (no --set that switches features off)")

    def _callback_keys(self) -> list[tuple[str, Callback]]:
        """Stable keys for callback state: class name plus a counter among callbacks of that class."""
        seen: dict[str, int] = {}
        out = []
        for cb in self.callbacks:
            name = type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            out.append((f"{name}:{seen[name]}", cb))
        return out

    def _checkpoint(self, metrics: dict) -> None:
        if not self.write:
            return
        state = self._state()  # collective under FSDP: every rank takes part
        if not self.dist.is_main:
            return
        bare = unwrap(self.model)
        from lotus.parallel.checkpoint import is_sharded

        full = state["model"] if is_sharded(bare) else None  # FSDP2: write the gathered weights
        acc = metrics.get("val_acc")
        meta = {"epoch": self.epoch, "step": self.step, "val_acc": acc, "model": self.cfg.model.name}
        if acc is not None and acc > self.best_acc:
            self.best_acc = acc
            state["best_acc"] = acc
            if self.cfg.output.save_best:
                save_weights(bare, os.path.join(self.run_dir, "best.safetensors"), meta, state_dict=full)
        if self.cfg.output.save_last:
            save_weights(bare, os.path.join(self.run_dir, "last.safetensors"), meta, state_dict=full)
        save_state(os.path.join(self.run_dir, "state.pt"), state)

    def _summary(self, last: dict) -> dict:
        bare = unwrap(self.model)
        params = sum(p.numel() for p in bare.parameters())
        from lotus.checkpoint import export_state_dict
        from lotus.parallel.checkpoint import get_full_state, is_sharded

        sd = get_full_state(self.model)[0] if is_sharded(bare) else export_state_dict(bare)  # collective under FSDP2
        weights = [v for k, v in sd.items() if v.is_floating_point()]
        nonzero = int(sum(int((v != 0).sum()) for v in weights))
        return {
            "name": self.cfg.name, "run_dir": os.path.abspath(self.run_dir), "model": self.cfg.model.name,
            "epochs": self.epoch, "steps": self.step, "samples_seen": self.samples_seen,
            "wall_s": round(self.wall, 3), "train_flops": self.train_flops,
            "final_val_acc": last.get("val_acc"), "final_val_loss": last.get("val_loss"),
            "best_val_acc": self.best_acc if self.best_acc >= 0 else None,
            "params": params, "nonzero_params": nonzero, "device": str(self.device),
            "world_size": self.dist.world_size, "events": self.events,
        }


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _set_numpy_state(s: dict) -> None:
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def train(cfg: Config | str, overrides: list[str] | None = None, **kwargs: Any) -> dict:
    """Train from a :class:`Config` or a YAML path; returns the run summary."""
    if not isinstance(cfg, Config):
        cfg = load_config(cfg, overrides)
    return Trainer(cfg, **kwargs).fit()


def config_dict(cfg: Config) -> dict:
    return config_to_dict(cfg)
