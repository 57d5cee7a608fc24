"""Comparisons of a resumed trainer with an uninterrupted one, shared by the trainer tests."""

from __future__ import annotations

import numpy as np
import torch

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
