"""``lotus bench``: several configs x seeds trained side by side, compared on time-to-accuracy (the runs; their
analysis and report are in :mod:`lotus.bench_report`).

For each config and seed a normal training run is written under ``OUT/<config>/seed<k>``. The target
accuracy defaults to the first (baseline) config's mean final accuracy minus 0.5 pp; a run's
time-to-target is the training time (evaluation excluded, every schedule event such as scoring or
pruning included) at the first epoch whose validation accuracy reaches it. Runs are interleaved
(seed 0 of every config, then seed 1, ...) so machine noise hits all configs alike.

A config whose seeds do not all reach the target has no mean time-to-target. If that config is the
baseline, the speed-ups of the others are reported as lower bounds: the baseline's unreached seeds are
counted at their full training time (they would have needed at least that), shown as ``>= N.NNx``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Union

from tqdm import tqdm

from lotus.callbacks import Callback
from lotus.config import config_to_dict, load_config
from lotus.config_upgrade import load_saved_config
from lotus.errors import LotusError
from lotus.training import Trainer

__all__ = ["BenchResult", "EpochBar", "run_bench"]


@dataclass
class BenchResult:
    name: str
    config: str
    runs: list[str] = field(default_factory=list)


ConfigSpec = Union[str, "tuple[str, list[str]]"]


class EpochBar(Callback):
    """A tqdm bar over one run's epochs (val acc in the postfix); nothing when ``enabled`` is False."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=trainer.cfg.train.epochs,
                initial=trainer.epoch,
                desc=self.desc,
                leave=False,
                dynamic_ncols=True,
                unit="ep",
            )

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if self.bar is not None:
            if metrics.get("val_acc") is not None:
                self.bar.set_postfix_str(f"val {metrics['val_acc'] * 100:.1f}%")
            self.bar.update(1)

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _train_run(path: str, overrides: list[str], run_dir: str, bar: bool = False, desc: str = "") -> dict:
    """One bench run (also the worker of ``--jobs``: a fresh process, threads pinned by ``overrides``)."""
    cfg = load_config(path, overrides)
    return Trainer(cfg, callbacks=[EpochBar(desc, bar)], run_dir=run_dir, quiet=True).fit()


def _split_spec(spec: ConfigSpec) -> tuple[str, list[str]]:
    return (spec, []) if isinstance(spec, str) else (spec[0], list(spec[1]))


def run_bench(
    config_paths: list[ConfigSpec],
    seeds: int | list[int],
    out: str,
    overrides: list[str] | None = None,
    quiet: bool = False,
    progress: bool = True,
    jobs: int = 1,
) -> list[BenchResult]:
    """Train every config with seeds 0..seeds-1 (or the listed seed offsets), interleaved, under ``out``.

    A config is a path or ``(path, [KEY=VALUE, ...])`` (its own overrides after the shared ones; a
    ``name=...`` override names a variant). ``jobs > 1`` trains that many runs side by side in worker
    processes, each pinned to ``cpu_count // jobs`` threads unless ``train.threads`` is overridden.
    """
    shared = list(overrides or [])
    specs = [_split_spec(c) for c in config_paths]
    cfgs = [(p, own, load_config(p, shared + own)) for p, own in specs]
    names = [c.name for _, _, c in cfgs]
    if len(set(names)) != len(names):
        raise LotusError(f"--configs: config names must differ (got {names}); rename a file")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if jobs > 1 and not any(o.split("=", 1)[0].strip() == "train.threads" for o in shared):
        shared.append(f"train.threads={max(1, (os.cpu_count() or 1) // jobs)}")
    results = [BenchResult(c.name, p) for p, _, c in cfgs]
    todo = []
    for seed in seed_list:
        for i, (path, own, base) in enumerate(cfgs):
            run_dir = os.path.join(out, base.name, f"seed{seed}")
            run_overrides = shared + own + [f"train.seed={base.train.seed + seed}", "output.report=false"]
            if os.path.isfile(os.path.join(run_dir, "summary.json")):
                _check_reusable(run_dir, path, run_overrides)
            elif os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                raise LotusError(
                    f"bench: {run_dir} holds an unfinished run; delete it or resume it with lotus train --resume"
                )
            else:
                todo.append((i, seed, path, run_overrides, run_dir))
            results[i].runs.append(run_dir)
    bar = tqdm(total=len(todo), desc="bench", disable=not progress, dynamic_ncols=True)
    tty = progress and sys.stderr.isatty()

    def done(i: int, seed: int, summary: dict) -> None:
        if not quiet:
            bar.write(
                f"{cfgs[i][2].name} seed {seed}: final val acc {summary['final_val_acc'] * 100:.2f}% "
                f"in {summary['wall_s']:.1f} s"
            )
        bar.update(1)

    if jobs <= 1:
        for i, seed, path, run_overrides, run_dir in todo:
            bar.set_postfix_str(f"{cfgs[i][2].name} seed {seed}")
            done(i, seed, _train_run(path, run_overrides, run_dir, tty, f"{cfgs[i][2].name} s{seed}"))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [(i, seed, pool.submit(_train_run, path, o, d)) for i, seed, path, o, d in todo]
            for i, seed, fut in futures:  # in submission order (interleaved), so output stays ordered
                done(i, seed, fut.result())
    bar.close()
    return results


def _check_reusable(run_dir: str, path: str, run_overrides: list[str]) -> None:
    """A finished run is reused only if it was trained with the same config (the bench is resumable)."""
    wanted = config_to_dict(load_config(path, run_overrides))
    saved = config_to_dict(load_saved_config(os.path.join(run_dir, "config.yaml")))
    for d in (wanted, saved):
        d["output"]["dir"] = None
    saved["name"] = wanted["name"]
    if saved != wanted:
        raise LotusError(
            f"bench: {run_dir} was trained with another config than {path} (+ --set); delete it or use another --out"
        )
