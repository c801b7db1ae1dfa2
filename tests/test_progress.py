"""bestie.progress: tqdm on a terminal, plain log lines with rate and ETA in log files (issue 18)."""

from __future__ import annotations

import io
import logging
import re

from bestie.progress import LogProgress, format_seconds, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_every_ten_percent_with_rate_and_eta(caplog, monkeypatch):
    import bestie.progress as bp

    clock = [1000.0]
    monkeypatch.setattr(bp.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="bestie.progress")
    bar = progress(total=40, initial=0, desc="classifier pam", stream=io.StringIO())
    assert isinstance(bar, LogProgress)
    with bar:
        for i in range(40):
            clock[0] += 0.5  # 2 steps per second
            bar.update(1)
            bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}", refresh=False)
    assert len(bar.lines) == 10  # 4, 8, ..., 40
    assert [int(re.search(r": (\d+)/40", l).group(1)) for l in bar.lines] == list(range(4, 41, 4))
    assert bar.lines[0] == "classifier pam: 4/40 (10%), 2.00 it/s, ETA 18s, loss=0.333"  # 36 steps left at 2/s
    assert bar.lines[-1] == "classifier pam: 40/40 (100%), 2.00 it/s, ETA 0s, loss=0.026"
    logged = [r.getMessage() for r in caplog.records if r.name == "bestie.progress"]
    assert logged == bar.lines and all("\r" not in l for l in logged)


def test_resumed_iterable_unknown_total_and_disabled(caplog):
    caplog.set_level(logging.INFO, logger="bestie.progress")
    bar = progress(total=100, initial=50, desc="bestie", every=25, stream=io.StringIO())
    for _ in range(50):
        bar.update()
    assert [l.split(" (")[0] for l in bar.lines] == ["bestie: 75/100", "bestie: 100/100"]
    items = list(progress(["a", "b", "c"], desc="predict", stream=io.StringIO()))
    assert items == ["a", "b", "c"]
    gen = progress((x for x in range(3)), desc="gen", stream=io.StringIO())
    assert list(gen) == [0, 1, 2] and gen.lines == ["gen: 3 done, " + gen.lines[0].split("done, ", 1)[1]]
    quiet = progress(total=10, disable=True, stream=io.StringIO())
    quiet.update(10)
    assert quiet.lines == []


def test_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    out = _Tty()
    with progress(total=5, desc="t", stream=out) as bar:
        assert isinstance(bar, tqdm)
        bar.update(5)
    assert "5/5" in out.getvalue()


def test_format_seconds():
    assert [format_seconds(s) for s in (5.2, 93, 4000, float("nan"))] == ["5s", "1m33s", "1h06m", "?"]


_JOB = """
import logging, sys
import bestie.progress as p
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
p.TERMINAL_INTERVAL = float(sys.argv[1])
with p.progress(total=4, desc="train") as bar:
    for _ in range(4):
        bar.update(1)
"""


def _job(tmp_path, env_rule: str | None, interval: float, redirect_fd3: bool = True):
    """Run a 4-step job as the workflow's rules do: `BESTIE_RULE=<rule> 3>&2 python ... > log 2>&1`."""
    import os
    import shlex
    import subprocess
    import sys

    log = tmp_path / "job.log"
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(_JOB)} {interval} > {shlex.quote(str(log))} 2>&1"
    if redirect_fd3:
        cmd = "3>&2 " + cmd
    if env_rule:
        cmd = f"BESTIE_RULE={env_rule} " + cmd
    env = {k: v for k, v in os.environ.items() if k != "BESTIE_RULE"}
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60, check=True)
    return proc.stderr, log.read_text()


def test_workflow_terminal_gets_rule_prefixed_lines_and_the_log_keeps_its_own(tmp_path):
    terminal, log = _job(tmp_path, "train_bestie", interval=0.0)
    lines = terminal.splitlines()
    # interval 0: every step reaches the terminal, prefixed with the rule; the final line once
    assert [l.split(" (")[0] for l in lines] == [f"[train_bestie] train: {i}/4" for i in range(1, 5)]
    assert "ETA" in lines[-1] and "(100%)" in lines[-1]
    assert "[train_bestie]" not in log and "train: 4/4 (100%)" in log  # the log has its plain lines
    # the default interval (20 s): a 4-step job that ends at once shows its final line only
    terminal, _ = _job(tmp_path, "train_bestie", interval=20.0)
    assert len(terminal.splitlines()) == 1 and terminal.startswith("[train_bestie] train: 4/4 (100%)")


def test_a_file_that_takes_descriptor_3_gets_no_progress_lines(tmp_path):
    """A rule's command run without `3>&2`: the first file the stage opens is descriptor 3 (here the JSONL
    log a training writes); it must hold only what the stage writes, never the terminal's progress lines."""
    import os
    import shlex
    import subprocess
    import sys

    artifact = tmp_path / "train_log.jsonl"
    job = (
        "import bestie\n"  # the package is imported first, as `python -m bestie` does
        "import bestie.progress as p\n"
        f"f = open({str(artifact)!r}, 'w')\n"
        "assert f.fileno() == p.TERMINAL_FD, f.fileno()\n"
        "p.TERMINAL_INTERVAL = 0.0\n"
        "with p.progress(total=3, desc='train') as bar:\n"
        "    for _ in range(3):\n"
        "        bar.update(1)\n"
        "        f.write('{\"iteration\": 1}\\n'); f.flush()\n"
    )
    cmd = f"BESTIE_RULE=train_bestie {shlex.quote(sys.executable)} -c {shlex.quote(job)} 3>&- > /dev/null 2>&1"
    env = {k: v for k, v in os.environ.items() if k != "BESTIE_RULE"}
    subprocess.run(["bash", "-c", cmd], env=env, timeout=60, check=True)
    assert artifact.read_text().splitlines() == ['{"iteration": 1}'] * 3


def test_no_terminal_lines_outside_the_workflow(tmp_path):
    assert _job(tmp_path, None, interval=0.0)[0] == ""  # no rule named: a plain CLI run
    assert _job(tmp_path, "r", interval=0.0, redirect_fd3=False)[0] == ""  # descriptor 3 not open
