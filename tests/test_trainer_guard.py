"""The NaN / inf guard of the training loop checked at log time (bestie.trainer.FiniteGuard, issue 16)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bestie import engine, trainer
from bestie.errors import TrainingError


def _optimization():
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=0.1)
    return p, trainer.Optimization(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0),
                                   engine.create_grad_scaler("cpu", False))


@contextlib.contextmanager
def _host_checks():
    """Record the iterations at which the loop calls the host-side engine.check_finite (each one a sync)."""
    calls, real = [], engine.check_finite

    def counting(losses, it):
        calls.append(it)
        real(losses, it)

    engine.check_finite = counting
    try:
        yield calls
    finally:
        engine.check_finite = real


def _run(bad_at: int | None, log_every: int, periodic_every: int, max_iters: int = 10):
    p, optimization = _optimization()
    logged, acted = [], []

    def step(it):
        loss = (p - 1.0) ** 2
        if it == bad_at:
            loss = loss * float("nan")
        return {"total": loss, "seg": torch.tensor(0.5 + it), "diag": torch.tensor(float("inf"))}

    def on_log(done, lr):
        logged.append(done)

    with _host_checks() as calls:
        trainer.train_loop(0, max_iters, step, optimization, objective="total", log_every=log_every, on_log=on_log,
                           periodic=[(periodic_every, acted.append)], not_guarded={"diag"}, guard_at_log=True)
    return logged, acted, calls


def test_guard_at_log_reports_the_first_bad_iteration_before_the_next_record() -> None:
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration 3: total=nan, seg=3\.5"):
        _run(bad_at=3, log_every=5, periodic_every=0)
    # the record of iteration 5 is never written; neither is a periodic action due after the bad iteration
    logged, acted = [], []
    p, optimization = _optimization()

    def step(it):
        return {"total": (p - 1.0) ** 2 * (float("nan") if it == 3 else 1.0)}

    with pytest.raises(TrainingError, match="iteration 3"):
        trainer.train_loop(0, 10, step, optimization, objective="total", log_every=5,
                           on_log=lambda d, lr: logged.append(d), periodic=[(4, acted.append)], guard_at_log=True)
    assert logged == [] and acted == []  # the check before the action of iteration 4 raised


def test_guard_at_log_never_checks_on_the_host_while_finite() -> None:
    logged, acted, calls = _run(bad_at=None, log_every=5, periodic_every=4)
    assert logged == [5, 10] and acted == [4, 8]
    assert calls == []  # no host check_finite call (no sync) in a finite run: 'diag' (inf) is not guarded


def test_guard_per_iteration_without_the_option() -> None:
    p, optimization = _optimization()
    with _host_checks() as seen:
        trainer.train_loop(0, 3, lambda it: {"total": (p - 1.0) ** 2}, optimization, objective="total",
                           log_every=5, on_log=lambda d, lr: None)
    assert seen == [0, 1, 2]
