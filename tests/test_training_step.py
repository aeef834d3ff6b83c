"""The training step keeps the host out of the loop: loss sums and finite checks stay on the device."""

from __future__ import annotations

import pytest
import torch

from lotus.callbacks import Callback
from lotus.config import config_from_dict
from lotus.errors import LotusError
from lotus.training import Trainer
from lotus.training.step import LossMeter


def _fit(d, **kw):
    t = Trainer(config_from_dict(d), write=False, quiet=True, **kw)
    summary = t.fit()
    return t, summary


def test_finite_check_interval_does_not_change_results(tiny_cfg_dict):
    tiny_cfg_dict["data"]["limit_train"] = 256
    tiny_cfg_dict["train"]["finite_check_every"] = 1
    a, sa = _fit(tiny_cfg_dict)
    tiny_cfg_dict["train"]["finite_check_every"] = 1000
    b, sb = _fit(tiny_cfg_dict)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa["final_val_loss"] == sb["final_val_loss"] and sa["steps"] == sb["steps"]


class _PoisonAt(Callback):
    def __init__(self, step):
        self.step = step

    def per_sample_loss(self, trainer, loss, index):
        return loss * float("inf") if trainer.step + 1 == self.step else loss


def test_non_finite_loss_is_reported_with_its_step_at_the_next_check(tiny_cfg_dict):
    tiny_cfg_dict["data"]["limit_train"] = 256  # 8 steps an epoch
    tiny_cfg_dict["train"]["finite_check_every"] = 1000  # only the epoch-end check
    with pytest.raises(LotusError, match=r"loss became (inf|nan) at step 3 \(epoch 1\); stopped, no checkpoint"):
        _fit(tiny_cfg_dict, callbacks=[_PoisonAt(3)])


def test_loss_meter_tracks_the_first_bad_step():
    m = LossMeter(torch.device("cpu"))
    m.add(torch.tensor(2.0), 4, 1)
    assert m.first_non_finite() is None and m.mean() == 2.0
    m.add(torch.tensor(float("nan")), 4, 2)
    m.add(torch.tensor(float("inf")), 4, 3)
    step, value = m.first_non_finite()
    assert step == 2 and value != value  # nan


class _SyncDebug(Callback):
    """Raises on any host sync between the first and the last step of each epoch."""

    def on_epoch_start(self, trainer, epoch):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def on_step_end(self, trainer, step):
        if step % trainer.steps_per_epoch == 0:  # the epoch's last step: the epoch-end check may sync
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_steps_never_sync(tiny_cfg_dict):
    tiny_cfg_dict["data"]["limit_train"] = 512
    tiny_cfg_dict["train"].update(device="cuda", finite_check_every=10_000, epochs=2)
    try:
        _fit(tiny_cfg_dict, callbacks=[_SyncDebug()])
    finally:
        torch.cuda.set_sync_debug_mode(0)
