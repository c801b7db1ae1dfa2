"""Fixtures shared by several test modules, and the order in which ``make test`` hands modules out.

``make test`` runs the suite in parallel (pytest-xdist, ``--dist loadfile``: each module on one worker,
so a module's fixture runs once). Workers take modules in collection order, so the modules with the
longest runs are put first (:data:`LONGEST_FIRST`): the others fill the second worker meanwhile
instead of leaving the longest module as the tail of the run.
"""

from __future__ import annotations

import os
import resource

import pytest
import torch


#: modules by decreasing CPU time (2 cores, BESTIE_TEST_CPU_LOG below, measured 2026-12-06): the workflow
#: end to end (93 CPU-s), the SIGKILL / resume runs (23), the predict stage (21), the benchmark smoke run
#: (20), Mask R-CNN (16), BESTIE training (14), the determinism runs (10); the rest under 8 each
LONGEST_FIRST = ("test_workflow_e2e.py", "test_engine.py", "test_predict.py", "test_benchmarks.py",
                 "test_maskrcnn.py", "test_train_bestie.py", "test_determinism.py", "test_classifier_stage.py",
                 "test_check.py")


def pytest_collection_modifyitems(session, config, items):
    """Put the modules of :data:`LONGEST_FIRST` first, in that order; the rest keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept


@pytest.fixture()
def one_thread():
    """Run the test with one torch thread (byte-for-byte comparable training runs), then restore the count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: ``BESTIE_TEST_CPU_LOG=path``: append one line per test, "<module> <test> <CPU-s>", the user + sys CPU
#: of the pytest process and of its children that ended during the test (fixtures included: a module's
#: shared fixture is counted in its first test). Sum per module with
#: ``awk '{s[$1]+=$3} END {for (m in s) print s[m], m}' path | sort -rn``.
_CPU_LOG = os.environ.get("BESTIE_TEST_CPU_LOG")


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if _CPU_LOG:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        start = _cpu_seconds()
        yield
        with open(_CPU_LOG, "a") as fh:
            fh.write(f"{item.path.name} {item.name.replace(' ', '_')} {_cpu_seconds() - start:.2f}\n")
