"""Comparisons of a resumed trainer with an uninterrupted one, shared by the trainer tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def run_epochs(trainer, stop: int, make_batch: Callable[[int], dict], seed_each_step: bool = False) -> None:
    """nnU-Net's ``run_training`` loop from ``trainer.current_epoch`` to ``stop`` on ``make_batch(seed)`` batches.

    Step ``i`` of epoch ``e`` trains on ``make_batch(1000 e + i)`` and validates on ``make_batch(77 + e)``, so two
    runs see the same batches; ``seed_each_step`` also seeds torch and numpy with that number before each step
    (trainers that draw inside the step).
    """
    for epoch in range(trainer.current_epoch, stop):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = []
        for i in range(trainer.num_iterations_per_epoch):
            if seed_each_step:
                torch.manual_seed(1000 * epoch + i)
                np.random.seed(1000 * epoch + i)
            outputs.append(trainer.train_step(make_batch(1000 * epoch + i)))
        trainer.on_train_epoch_end(outputs)
        trainer.on_validation_epoch_start()
        if seed_each_step:
            np.random.seed(77 + epoch)
        with torch.no_grad():
            trainer.on_validation_epoch_end([trainer.validation_step(make_batch(77 + epoch))])
        trainer.on_epoch_end()


#: Logged wall-clock times: the only entries that differ between a resumed and an uninterrupted run.
TIMESTAMP_KEYS = ("epoch_start_timestamps", "epoch_end_timestamps")


def logs_without_timestamps(trainer) -> dict:
    """nnU-Net's logger entries of ``trainer`` except the timestamps."""
    return {k: v for k, v in trainer.logger.local_logger.my_fantastic_logging.items() if k not in TIMESTAMP_KEYS}


def assert_same_modules(expected, got, modules: tuple[str, ...], rtol: float, atol: float) -> None:
    """Every tensor of each named module (attribute) of ``got`` equals ``expected``'s, in order."""
    for module in modules:
        for (name, a), b in zip(getattr(expected, module).state_dict().items(),
                                getattr(got, module).state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=f"{module}.{name}")


def assert_same_optimizer_state(expected, got, optimizers: tuple[str, ...], key: str, rtol: float,
                                atol: float) -> None:
    """The ``key`` tensors (e.g. Adam's ``exp_avg``) of each named optimiser agree, and there are some."""
    for optimizer in optimizers:
        values_a = [s[key] for s in getattr(expected, optimizer).state_dict()["state"].values()]
        values_b = [s[key] for s in getattr(got, optimizer).state_dict()["state"].values()]
        assert len(values_a) == len(values_b) > 0
        for a, b in zip(values_a, values_b, strict=True):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


def assert_same_logs(expected: dict, got: dict, rtol: float, atol: float = 0.0, length: int | None = None) -> None:
    """Every logged entry agrees (and has ``length`` values, if given)."""
    for key in expected:
        if length is not None:
            assert len(got[key]) == length, key
        np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(expected[key], float), rtol=rtol,
                                   atol=atol, err_msg=key)
