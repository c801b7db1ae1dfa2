"""Training engine: exact resume, NaN guard, weights_only checkpoints, schedules, sampler, JSON log."""

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bestie.engine import (
    JsonLog,
    ResumableSampler,
    WarmupMultiStepLR,
    WarmupPolyLR,
    autocast_context,
    check_finite,
    create_grad_scaler,
    infinite_loader,
    init_distributed,
    load_checkpoint,
    partial_checkpoint_path,
    read_checkpoint,
    sample_rng,
    save_checkpoint,
)
from bestie.errors import ArtifactError, ConfigError, TrainingError


class NoisyData(torch.utils.data.Dataset):
    """x_i fixed; each draw adds augmentation noise from the per-sample generator."""

    def __init__(self, n=13):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i = key[0]
        noise = torch.from_numpy(sample_rng(key, seed=7).normal(0, 0.1, 4).astype(np.float32))
        return self.x[i] + noise, self.y[i]


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = WarmupPolyLR(opt, warmup_iters=3, max_iters=20)
    data = NoisyData()
    sampler = ResumableSampler(len(data), seed=5)
    # own generator: a DataLoader without one draws its base seed from the global torch RNG at every
    # epoch start, which would shift the dropout stream of a resumed run
    loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=sampler,
                                         generator=torch.Generator().manual_seed(0))  # 5 batches / epoch
    return model, opt, sched, loader, sampler


def _train(model, opt, sched, loader, sampler, start, stop):
    stream = infinite_loader(loader, sampler, start_iteration=start)
    model.train()
    for it in range(start, stop):
        x, y = next(stream)
        loss = torch.nn.functional.mse_loss(model(x), y)
        check_finite({"loss": loss}, it)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_matches_straight_training(tmp_path):
    # 2N straight
    model_a, opt_a, sched_a, loader_a, sampler_a = _setup()
    _train(model_a, opt_a, sched_a, loader_a, sampler_a, 0, 14)
    # N, checkpoint, fresh objects (different init seed, different global RNG), load, N more
    model_b, opt_b, sched_b, loader_b, sampler_b = _setup()
    _train(model_b, opt_b, sched_b, loader_b, sampler_b, 0, 7)  # stops mid-epoch (5 batches/epoch)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model_b, opt_b, sched_b, None, 7, {"note": "half", "cfg": {"a": [1, 2]}})
    model_c, opt_c, sched_c, loader_c, sampler_c = _setup(seed=99)
    torch.manual_seed(1234)
    np.random.seed(1)
    random.seed(2)
    state = load_checkpoint(path, model_c, opt_c, sched_c)
    assert state == {"iteration": 7, "extra": {"note": "half", "cfg": {"a": [1, 2]}}}
    _train(model_c, opt_c, sched_c, loader_c, sampler_c, state["iteration"], 14)
    for (k, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(a, c), k
    assert sched_c.last_epoch == sched_a.last_epoch == 14
    # the comparison is sensitive: without the restored RNG (dropout) the result differs
    model_d, opt_d, sched_d, loader_d, sampler_d = _setup(seed=99)
    load_checkpoint(path, model_d, opt_d, sched_d, restore_rng=False)
    torch.manual_seed(4321)
    _train(model_d, opt_d, sched_d, loader_d, sampler_d, 7, 14)
    assert not torch.equal(model_d[0].weight, model_a[0].weight)


def test_checkpoint_is_weights_only_loadable(tmp_path):
    model, opt, sched, _, _ = _setup()
    scaler = create_grad_scaler("cpu")
    path = tmp_path / "sub" / "ck.pt"
    extra = {"names": ["a", "b"], "x": np.float32(1.5), "arr": np.arange(3), "where": tmp_path}
    save_checkpoint(path, torch.nn.DataParallel(model), opt, sched, scaler, 3, extra)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["iteration"] == 3 and raw["extra"]["names"] == ["a", "b"] and raw["extra"]["x"] == 1.5
    assert torch.equal(raw["extra"]["arr"], torch.arange(3)) and raw["extra"]["where"] == str(tmp_path)
    assert all(not k.startswith("module.") for k in raw["model"])  # DataParallel unwrapped
    assert {"python", "numpy", "torch"} <= set(raw["rng"])
    assert not [p for p in os.listdir(path.parent) if p != "ck.pt"]  # no temp file left
    save_checkpoint(tmp_path / "other.pt", model, rank=1)  # rank != 0 writes nothing
    assert not (tmp_path / "other.pt").exists()
    with pytest.raises(TypeError, match=r"extra\.bad"):
        save_checkpoint(tmp_path / "other.pt", model, extra={"bad": object()})
    assert not (tmp_path / "other.pt").exists()


def test_bad_checkpoints_raise_artifact_error(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ArtifactError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt", model)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="bad.pt"):
        load_checkpoint(bad, model)
    save_checkpoint(tmp_path / "lin.pt", torch.nn.Linear(3, 2))
    with pytest.raises(ArtifactError, match="does not fit"):
        load_checkpoint(tmp_path / "lin.pt", model)


def test_nan_loss_raises_with_iteration_and_values():
    check_finite({"a": torch.tensor(1.0), "b": torch.tensor([0.5])}, 3)  # finite: no error
    with pytest.raises(TrainingError, match=r"iteration 42.*seg=0\.25.*center=nan"):
        check_finite({"seg": torch.tensor(0.25), "center": torch.tensor(float("nan"))}, 42)
    with pytest.raises(TrainingError, match=r"iteration 7.*loss=inf"):
        check_finite({"loss": torch.tensor(float("inf"))}, 7)


def test_schedules_by_hand():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 10.0}])
    s = WarmupPolyLR(opt, warmup_iters=4, max_iters=10, power=0.9, warmup_factor=0.2)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    expected = [0.2, 0.4, 0.6, 0.8] + [(1 - t / 10) ** 0.9 for t in range(4, 11)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert opt.param_groups[1]["lr"] == 0.0  # both groups scaled, 0 at max_iters
    opt2 = torch.optim.SGD([p], lr=1.0)
    m = WarmupMultiStepLR(opt2, milestones=[3, 5], gamma=0.1)
    got = []
    for _ in range(7):
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        m.step()
    np.testing.assert_allclose(got, [1, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-12)


def test_sampler_epochs_shards_and_skip():
    s = ResumableSampler(10, seed=3)
    s.set_epoch(0)
    e0 = [i for i, _ in s]
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == list(range(10)) and [i for i, _ in e1] != e0 and all(e == 1 for _, e in e1)
    s.set_epoch(0)
    s.set_start(4)
    assert [i for i, _ in s] == e0[4:] and len(s) == 6
    shards = [ResumableSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    got = []
    for sh in shards:
        sh.set_epoch(0)
        got += [i for i, _ in sh]
    assert len(got) == 12 and set(got) == set(range(10))  # padded to a multiple of 3, disjoint cover


def test_sampler_permutations_are_the_trainers_data_orders():
    """The one sampler keeps each trainer's data order: per-epoch layout + torch permutation (classifier,
    Mask R-CNN), stream layout + numpy permutation (BESTIE, before: instance_data.IterationSampler with
    (epoch, index) keys). Changing either changes the trainer's weights and the resume of partial
    checkpoints."""
    s = ResumableSampler(7, seed=11)
    for epoch in (0, 3):
        s.set_epoch(epoch)
        want = torch.randperm(7, generator=torch.Generator().manual_seed(11 + epoch)).tolist()
        assert list(s) == [(i, epoch) for i in want]
    n, B = 5, 2
    stream = ResumableSampler(n, 11, global_batch=B, permutation="numpy")
    want = [(int(i), e) for e in range(3) for i in np.random.default_rng([11, e]).permutation(n)]
    assert [k for t in range(7) for k in stream.keys_for_iteration(t)] == want[: 7 * B]
    it = iter(ResumableSampler(n, 11, global_batch=B, start_iteration=2, permutation="numpy"))
    assert [next(it) for _ in range(6)] == want[2 * B: 5 * B]
    with pytest.raises(TypeError):
        len(stream)
    with pytest.raises(ConfigError):
        s.keys_for_iteration(0)
    with pytest.raises(ConfigError):
        ResumableSampler(n, 11, permutation="random")


def test_infinite_loader_without_set_start_skips_batches():
    data = list(range(7))
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)  # 4 batches / epoch
    stream = infinite_loader(loader, start_iteration=5)  # epoch 1, batch 1
    assert [next(stream).tolist() for _ in range(4)] == [[2, 3], [4, 5], [6], [0, 1]]


def test_json_log_and_single_process(tmp_path):
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_distributed, info.device.type) == (0, 1, False, "cpu")
    path = tmp_path / "log.jsonl"
    with JsonLog(path) as log:
        log.write({"iteration": 1, "loss": torch.tensor(0.5)}, lr=0.01)
        log.write(iteration=2, loss=float("nan"))
    JsonLog(path, rank=1).write(iteration=3)
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert [l["iteration"] for l in lines] == [1, 2]
    assert lines[0]["loss"] == 0.5 and lines[0]["lr"] == 0.01 and math.isfinite(lines[0]["time"])
    assert lines[1]["loss"] == "nan"


def test_amp_is_noop_on_cpu():
    with autocast_context("cpu", True):
        y = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    assert y.dtype == torch.float32
    assert not create_grad_scaler("cpu", True).is_enabled()


def test_partial_checkpoint_name_is_shared_and_not_a_pt_file(tmp_path):
    assert partial_checkpoint_path(tmp_path / "classifier" / "pam.pt") == tmp_path / "classifier" / "pam.pt.partial"
    assert partial_checkpoint_path("model.pt").name == "model.pt.partial"
    from bestie.stages import train_bestie, train_classifier

    for stage in (train_classifier, train_bestie):
        assert stage.partial_checkpoint_path(tmp_path / "m.pt") == tmp_path / "m.pt.partial"


class _Evil:
    """Unpickling it calls ``os.makedirs(marker)``: what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _hostile_file(tmp_path, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "foreign.pt"
    torch.save(wrap({"weight": torch.zeros(2, 2), "payload": _Evil(marker)}), path)
    return path, marker


@pytest.mark.parametrize("reader", ["engine", "backbones", "maskrcnn", "affinity"])
def test_foreign_checkpoint_with_pickle_payload_is_refused_unexecuted(tmp_path, reader):
    from bestie.errors import WeightsError
    from bestie.models import backbones, maskrcnn

    path, marker = _hostile_file(tmp_path, lambda sd: {"model": sd, "state_dict": sd, "format": "x"})
    if reader == "engine":
        with pytest.raises(ArtifactError, match=r"foreign\.pt.*weights_only=True"):
            read_checkpoint(path)
    elif reader == "backbones":
        with pytest.raises(WeightsError, match=r"foreign\.pt.*weights_only=True"):
            backbones.load_state_dict_file(path)
    elif reader == "maskrcnn":
        with pytest.raises(WeightsError, match=r"foreign\.pt.*weights_only=True"):
            maskrcnn.load_state_dict_file(path)
    else:
        from bestie.wsss.affinity import load_affinity_checkpoint

        with pytest.raises(ArtifactError, match=r"foreign\.pt"):
            load_affinity_checkpoint(path, None)
    assert not marker.exists()  # the payload never ran
    torch.load(path, weights_only=False)  # the file really is hostile: a full unpickle runs the payload
    assert marker.is_dir()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, iteration=1)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # bytes reach the temp file, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(ArtifactError, match=r"ck\.pt") as info:
        save_checkpoint(path, model, iteration=2)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before and read_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temp file left


_TRAINER = textwrap.dedent(
    """
    import sys, time
    import torch
    from bestie import engine

    out, total, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.set_num_threads(1)

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(123)
            self.x, self.y = torch.randn(13, 4, generator=g), torch.randn(13, 2, generator=g)
        def __len__(self):
            return 13
        def __getitem__(self, key):
            noise = torch.from_numpy(engine.sample_rng(key, seed=7).normal(0, 0.1, 4)).float()
            return self.x[key[0]] + noise, self.y[key[0]]

    engine.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = engine.WarmupPolyLR(opt, warmup_iters=3, max_iters=total)
    sampler = engine.ResumableSampler(13, seed=5)
    loader = torch.utils.data.DataLoader(Data(), batch_size=3, sampler=sampler, generator=torch.Generator())
    partial = engine.partial_checkpoint_path(out)
    start = engine.load_checkpoint(partial, model, opt, sched)["iteration"] if partial.is_file() else 0
    stream = engine.infinite_loader(loader, sampler, start_iteration=start)
    model.train()
    for it in range(start, total):
        x, y = next(stream)
        loss = torch.nn.functional.mse_loss(model(x), y)
        engine.check_finite({"loss": loss}, it)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        engine.save_checkpoint(partial, model, opt, sched, iteration=it + 1)
        print(it + 1, flush=True)
        if slow:
            time.sleep(0.3)
    engine.save_checkpoint(out, model, iteration=total)
    partial.unlink()
    """
)


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")

    def train(out, slow):
        return subprocess.Popen([sys.executable, "-c", _TRAINER, str(out), "12", slow], env=env,
                                stdout=subprocess.PIPE, text=True)

    straight = tmp_path / "a" / "model.pt"
    assert train(straight, "0").wait(timeout=300) == 0
    out = tmp_path / "b" / "model.pt"
    proc = train(out, "1")
    try:
        for line in proc.stdout:  # kill once the checkpoint of iteration 4 is on disk
            if int(line) >= 4:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = partial_checkpoint_path(out)
    assert not out.exists()  # no final artifact from the killed run
    done = read_checkpoint(partial)["iteration"]  # the partial checkpoint is complete and loadable
    assert 4 <= done < 12
    assert all(p.name.startswith(".") for p in out.parent.iterdir() if p != partial)  # at most a hidden temp
    assert train(out, "0").wait(timeout=300) == 0  # the rerun resumes from it ...
    assert not partial.exists()
    a, b = read_checkpoint(straight), read_checkpoint(out)
    assert a["iteration"] == b["iteration"] == 12
    for k, v in a["model"].items():  # ... and ends with exactly the uninterrupted run's weights
        assert torch.equal(v, b["model"][k]), k


# ------------------------------------------------------------------ issue 18: logs that survive a kill
def test_resumable_log_keeps_history_drops_relogged_iterations_and_finishes(tmp_path):
    from bestie.engine import partial_log_path

    path = tmp_path / "run" / "log.jsonl"
    side = partial_log_path(path)
    assert side == tmp_path / "run" / "log.jsonl.partial"
    first = JsonLog(path, start_iteration=0)
    first.write(event="start", iteration=0)
    for it in range(1, 8):  # checkpoint at 4; killed after logging 7
        first.write(iteration=it, loss=1.0 / it)
    first._fh.write('{"iteration": 8, "lo')  # a line torn by SIGKILL
    first._fh.flush()
    first.close()
    assert side.is_file() and not path.exists()  # nothing at the output path: Snakemake deletes nothing
    second = JsonLog(path, start_iteration=4)
    second.write(event="start", iteration=4)
    for it in range(5, 11):
        second.write(iteration=it, loss=1.0 / it)
    second.finish()
    assert path.is_file() and not side.exists()
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["iteration"] for r in recs if "event" not in r] == list(range(1, 11))  # each once
    resume = [r for r in recs if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["iteration"] == 4 and resume[0]["dropped"] == 4  # 5, 6, 7 + torn
    assert [r["iteration"] for r in recs if r.get("event") == "start"] == [0, 4]
    fresh = JsonLog(path, start_iteration=0)  # a fresh run (no partial checkpoint) starts a fresh history
    fresh.write(iteration=1, loss=0.5)
    fresh.finish()
    assert [json.loads(l)["iteration"] for l in path.read_text().splitlines()] == [1]
    plain = JsonLog(tmp_path / "plain.jsonl")  # plain mode: straight to the path, as before
    plain.write(iteration=1)
    with pytest.raises(RuntimeError, match="before the first write"):
        plain.begin(0)
    plain.finish()
    assert (tmp_path / "plain.jsonl").read_text().count("\n") == 1


def _train_pids(parent_pid: int) -> list[int]:
    import psutil

    try:
        children = psutil.Process(parent_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in children if "train-classifier" in " ".join(p.cmdline())]


def test_sigkill_under_snakemake_keeps_the_log_and_resumes_to_the_same_weights(tmp_path, one_thread):
    """The classifier job of the workflow is SIGKILLed mid-training; the rerun resumes from the partial
    checkpoint, its log holds every iteration 1..N exactly once plus a resume record, and its weights
    equal an uninterrupted run's (issue 18; the uninterrupted run is the stage called in this process
    with one torch thread, as the job has under ``--cores 1``)."""
    import time

    from bestie.data import generate_demo_dataset
    from bestie.data.demo import DEMO_CLASSES
    from workflow_util import REPO, SNAKEMAKE, tiny_config, write_config

    root = tmp_path / "demo"
    generate_demo_dataset(root, num_train=8, num_val=2, image_size=(64, 64), seed=1)
    ds = {"format": "voc", "root": str(root), "train_split": "train", "eval_split": "val",
          "classes": list(DEMO_CLASSES)}
    work = tmp_path / "work"
    work.mkdir()
    cfg = tiny_config("killed", ds)
    cfg["classifier_pam"].update(epochs=6, lr_steps=[], batch_size=2, resize=64, crop_size=64,
                                 checkpoint_every=3, num_workers=0)  # 4 iterations per epoch, 24 in all
    cfgs = {"killed": write_config(tmp_path / "killed.yaml", cfg)}
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def snake(run: str) -> subprocess.Popen:
        return subprocess.Popen([*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
                                 f"results/{run}/classifier/pam.pt", "--cores", "1", "--configfile", str(cfgs[run])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    k = work / "results" / "killed" / "classifier"
    side, final, partial = k / "pam_log.jsonl.partial", k / "pam_log.jsonl", k / "pam.pt.partial"
    proc = snake("killed")
    killed_at = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if side.is_file() and partial.is_file():
            its = [json.loads(l).get("iteration", 0) for l in side.read_text().splitlines() if l.endswith("}")]
            if max(its, default=0) >= 5:
                pids = _train_pids(proc.pid)
                if pids:
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                    killed_at = max(its)
                    break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert killed_at is not None and proc.returncode != 0, out[-3000:]
    assert side.is_file() and partial.is_file() and not final.exists() and not (k / "pam.pt").exists()
    kept = [json.loads(l) for l in side.read_text().splitlines() if l.endswith("}")]
    assert max(r.get("iteration", 0) for r in kept) >= 5  # the history survived the failed job

    rerun = snake("killed")
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert final.is_file() and not side.exists() and not partial.exists()
    recs = [json.loads(l) for l in final.read_text().splitlines()]
    assert [r["iteration"] for r in recs if "event" not in r] == list(range(1, 25))  # every iteration once
    resume = [r for r in recs if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["iteration"] % 3 == 0 and 3 <= resume[0]["iteration"] <= killed_at
    assert [r["resumed"] for r in recs if r.get("event") == "start"] == [False, True]
    from bestie.config import from_dict
    from bestie.stages import train_classifier as tc

    straight = tmp_path / "straight" / "pam.pt"
    tc.run(from_dict(tc.ClassifierConfig, cfg["classifier_pam"], "classifier_pam"), ds, straight,
           tmp_path / "straight" / "pam_log.jsonl", device="cpu")
    a = torch.load(straight, map_location="cpu", weights_only=True)
    b = torch.load(k / "pam.pt", map_location="cpu", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])


def test_resolve_device_choices_and_errors():
    from bestie.engine import resolve_device
    from bestie.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("") == resolve_device(None)
    with pytest.raises(ConfigError, match="evaluate: unsupported device 'meta'"):
        resolve_device("meta", "evaluate")
    with pytest.raises(ConfigError, match="predict: bad device 'gpu0'"):
        resolve_device("gpu0", "predict")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="make_cams: device 'cuda' requested but CUDA is not available"):
            resolve_device("cuda", "make_cams")
    else:
        with pytest.raises(ConfigError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}", "make_cams")
