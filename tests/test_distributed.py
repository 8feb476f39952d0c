"""torchrun runs (CPU, gloo, 2 processes), concurrent runs sharing caches, sweeps over GPUs
(doc/distributed.md)."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import run.distributed as distributed
from conftest import ROOT, args_for, cli, run_dir
from utils import RaftError


def torchrun(argv, nproc=2, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "main.py"), *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **kwargs)


def numbers(path):
    r = json.loads(path.read_text())
    return {k: r[k] for k in ("test_acc", "zero_shot_acc", "alpha", "val_acc")}, r


def test_shards_cover_every_item_once():
    for n in (0, 1, 2, 5, 9, 128, 1001):
        for size in (1, 2, 3, 8):
            parts = [distributed.World(rank, size).shard(n) for rank in range(size)]
            covered = [i for part in parts for i in range(n)[part]]
            assert covered == list(range(n)), (n, size)
            assert max(len(range(n)[p]) for p in parts) - min(len(range(n)[p]) for p in parts) <= 1


@pytest.mark.slow
def test_two_processes_end_with_the_numbers_of_one(dtd, tmp_path, capsys):
    """12 few-shot images in batches of 11: the last global batch has one image, so one process
    trains on nothing in that step; 9 test and 6 val images split unevenly across the two."""
    one = args_for(dtd, tmp_path, "--batch_size", "11", "--train_epoch", "4")
    assert cli(one, capsys)[0] == 0
    reference, r1 = numbers(run_dir(tmp_path) / "results.json")
    two = args_for(dtd, tmp_path, "--batch_size", "11", "--train_epoch", "4", "--output_dir", str(tmp_path / "out2"),
                   "--cache_dir", str(tmp_path / "cache2"))
    proc = torchrun(two)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    folder = tmp_path / "out2" / "dtd" / "tiny-rn_4shots_seed1"
    got, r2 = numbers(folder / "results.json")
    assert got == reference
    assert (r1["world_size"], r2["world_size"]) == (1, 2) and r2["sizes"] == r1["sizes"] == {"train": 12, "val": 6,
                                                                                             "test": 9}
    assert {k: v["test_acc"] for k, v in r2["baselines"].items()} == {k: v["test_acc"] for k, v in r1["baselines"].items()}
    a = torch.load(run_dir(tmp_path) / "checkpoint.pt", weights_only=True)["pool"]
    b = torch.load(folder / "checkpoint.pt", weights_only=True)["pool"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    stores = sorted((tmp_path / "cache2" / "features").glob("dtd_test_*/manifest.json"))
    assert len(stores) == 1 and json.loads(stores[0].read_text())["rows"] == 9   # every test image once
    assert out.count("results in") == 1                                           # rank 0 alone reports




@pytest.mark.slow
@pytest.mark.parametrize("backbone, precision, batch, shares", [("tiny-rn", "float32", "10", [1, 5]),
                                                                  ("tiny-vit", "float16_published", "11", [1, 5, 6]),
                                                                  ("tiny-siglip", "float32", "10", [1, 5])])
def test_dist_exact_trains_the_one_process_pool_bit_for_bit(dtd, tmp_path, capsys, backbone, precision, batch,
                                                            shares):
    """dist_exact: every process runs the pool on the gathered global batch, so the weights are
    the 1-process run's exactly (the ResNet's gathered maps lose the trunk's channels-last
    layout on the way; the ViT path allows the published code's float16 numerics). The one
    process uses one thread, as each torchrun process does: CPU kernels split their sums by
    thread, so the thread count is part of what fixes the rounding. Shares of every size: 12
    images in batches of 10 end in a global batch of 2 (a one-image share each, which the
    trunk would round differently alone); in batches of 11, in one of 1 (shares of 1 and 0)."""
    settings = ("--batch_size", batch, "--train_epoch", "4", "--backbone", backbone, "--pool_precision", precision,
                "--baselines", "[]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(args_for(dtd, tmp_path, *settings), capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    reference, _ = numbers(tmp_path / "out" / "dtd" / f"{backbone}_4shots_seed1" / "results.json")
    proc = torchrun(args_for(dtd, tmp_path, *settings, "--dist_exact", "true", "--output_dir", str(tmp_path / "out2"),
                             "--cache_dir", str(tmp_path / "cache2")))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    folder = tmp_path / "out2" / "dtd" / f"{backbone}_4shots_seed1"
    got, results = numbers(folder / "results.json")
    assert got == reference
    probe = results["numerics"]["share_rounding"]
    assert probe["exact"] and probe["share_sizes"] == shares
    a = torch.load(tmp_path / "out" / "dtd" / f"{backbone}_4shots_seed1" / "checkpoint.pt", weights_only=True)["pool"]
    b = torch.load(folder / "checkpoint.pt", weights_only=True)["pool"]
    assert all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.slow
def test_two_processes_without_the_feature_cache_end_with_the_numbers_of_one(dtd, tmp_path, capsys):
    """feature_cache: false — the uncached evaluation and the baselines' features of the few-shot
    images are computed in shares by the two processes and put back together: the same numbers,
    baselines included, as one process."""
    settings = ("--batch_size", "11", "--train_epoch", "2", "--feature_cache", "false")
    assert cli(args_for(dtd, tmp_path, *settings), capsys)[0] == 0
    reference, r1 = numbers(run_dir(tmp_path) / "results.json")
    proc = torchrun(args_for(dtd, tmp_path, *settings, "--output_dir", str(tmp_path / "out2"), "--cache_dir",
                             str(tmp_path / "cache2")))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    got, r2 = numbers(tmp_path / "out2" / "dtd" / "tiny-rn_4shots_seed1" / "results.json")
    assert got == reference and r2["sizes"] == r1["sizes"] == {"train": 12, "val": 6, "test": 9}
    # the shares' features agree with one process's to float32 rounding (bit for bit: --dist_exact,
    # above): a method whose prediction for an image sits on such a tie may flip that one image
    # (CLAP's 300 epochs at lr 0.1 on this random model do), never more
    assert set(r2["baselines"]) == set(r1["baselines"])
    for name, one in r1["baselines"].items():
        two = r2["baselines"][name]
        assert abs(two["test_acc"] - one["test_acc"]) <= 100 / 9 + 1e-6, name
        assert abs(two["val_acc"] - one["val_acc"]) <= 100 / 6 + 1e-6, name

def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry))
    return sorted(found)


@pytest.mark.slow
def test_a_killed_process_stops_the_run_and_any_number_of_processes_resumes_it(dtd, tmp_path, capsys):
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to find torchrun's worker processes")
    settings = ["--batch_size", "11", "--train_epoch", "30", "--save_every", "0", "--baselines", "[]"]
    assert cli(args_for(dtd, tmp_path, *settings, "--output_dir", str(tmp_path / "ref")), capsys)[0] == 0
    reference, _ = numbers(tmp_path / "ref" / "dtd" / "tiny-rn_4shots_seed1" / "results.json")
    argv = args_for(dtd, tmp_path, *settings)
    proc = torchrun(argv)
    log = run_dir(tmp_path) / "log.txt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or log.read_text().count("training state saved") < 4):
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2 and proc.poll() is None
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    survivor = [line for line in err.splitlines() if line.startswith("[rank0]") or line.startswith("error:")]
    assert not any("Traceback" in line for line in survivor), err[-3000:]   # the survivor: one line, no traceback
    assert "a collective with the other torchrun processes failed" in err
    assert (run_dir(tmp_path) / "resume.pt").is_file() and not (run_dir(tmp_path) / "results.json").exists()
    code, _, err = cli(argv, capsys)          # the same command, now with one process
    assert code == 0, err
    assert "resuming from" in log.read_text()
    got, r = numbers(run_dir(tmp_path) / "results.json")
    assert got == reference and r["world_size"] == 1


# --------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_an_unreachable_rendezvous_fails_in_bounded_time():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    start = time.monotonic()
    with pytest.raises(RaftError, match=f"cannot reach the torchrun rendezvous at 127.0.0.1:{port} within 2s"):
        distributed.wait_for_rendezvous("127.0.0.1", port, timeout=2)
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_device_and_process_checks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RaftError, match="device 'cuda' requested but CUDA is not available"):
        distributed.start_processes("cuda", 60)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RaftError, match="torchrun started 4 processes on this machine but it has 2 GPU"):
        distributed.start_processes("auto", 60)
    with pytest.raises(RaftError, match="each process uses the GPU of its local rank"):
        distributed.start_processes("cuda:1", 60)
    assert not distributed.WORLD.many


@pytest.mark.slow
def test_a_global_batch_smaller_than_the_processes_and_float16_published_are_refused(dtd, tmp_path, capsys,
                                                                                      monkeypatch):
    from run import engine
    from run import training
    monkeypatch.setattr(engine, "start_processes", lambda device, timeout: distributed.World(0, 4))
    code, _, err = cli(args_for(dtd, tmp_path, "--batch_size", "3"), capsys)
    assert code == 2 and "batch_size 3 is smaller than the 4 torchrun processes" in err
    monkeypatch.setattr(distributed.WORLD, "size", 2)   # the process-wide World, changed in place as torchrun would
    with pytest.raises(RaftError, match="float16_published trains as the published code does, in one process"):
        from clip.published import numerics_of
        from run.config import build_config
        cfg = build_config(None, {"dataset": "d", "data_path": "x", "pool_precision": "float16_published"})
        learner = training.RaftLearner(torch.nn.Linear(1, 1), torch.zeros(1, 2), numerics_of(cfg.pool_precision), cfg,
                                       torch.device("cpu"), False)
        training.train_pool(learner, None, cfg, None)


# --------------------------------------------------------------------------- caches shared by concurrent runs
BUILD = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {root!r})
    import numpy as np, torch
    from clip.backbone import FrozenCLIP, load_open_clip
    from datasets import read_coop_dataset
    from run.features import eval_store
    from utils import setup_logging
    log = setup_logging(None)
    data = read_coop_dataset("demo", {data!r})
    clip = FrozenCLIP(load_open_clip("tiny-rn", None), "tiny-rn")
    store = eval_store(clip, data.test, {cache!r}, "shared", 8, 0, torch.device("cpu"), False)
    print(json.dumps({{"rows": len(store), "sum": float(np.asarray(store.pooled, dtype=np.float64).sum())}}))
""")


@pytest.mark.slow
def test_two_processes_building_one_cache_at_once(demo_root, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(BUILD.format(root=str(ROOT), data=str(demo_root), cache=str(tmp_path / "cache")))
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1] and results[0]["rows"] == 32
    logs = "".join(out for out, _ in outs)
    assert logs.count("cached in") == 1 and logs.count("cached trunk features") == 1   # one built, one waited
    assert not [p for p in (tmp_path / "cache" / "features").iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- sweeps over GPUs and clusters
FAKE = textwrap.dedent("""\
    #!/usr/bin/env bash
    if [[ "$1" == *pending.py ]]; then exec {python} "$@"; fi
    echo "gpu=$CUDA_VISIBLE_DEVICES $*" >> {log}
    sleep 0.3
    [[ "$*" == *"--seed 2"* ]] && exit 1
    exit 0
""")


@pytest.mark.slow
def test_sweep_lists_pending_runs_and_spreads_them_over_gpus(tmp_path):
    out = tmp_path / "out"
    finished = out / "dtd" / "RN50_4shots_seed1"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    fake, calls = tmp_path / "fakepy", tmp_path / "calls.txt"
    fake.write_text(FAKE.format(python=sys.executable, log=calls))
    fake.chmod(0o755)
    for dataset in ("dtd", "eurosat"):    # their folders (the sweep checks they exist; the fake runs read nothing)
        (tmp_path / "data" / dataset).mkdir(parents=True)
    env = dict(os.environ, PYTHON=str(fake), DATA=str(tmp_path / "data"))
    listed = subprocess.run(["bash", str(ROOT / "scripts/sweep.sh"), "--list", "dtd", "4", "1 2 3", "--output_dir",
                             str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"cd {ROOT} && {fake} main.py --config configs/dtd.yaml")
                                   for line in lines)
    assert "--seed 1" not in listed.stdout                       # finished: not pending
    swept = subprocess.run(["bash", str(ROOT / "scripts/sweep.sh"), "dtd eurosat", "4", "1 2 3", "--output_dir",
                            str(out)], env=dict(env, GPUS="0 1"), capture_output=True, text=True, timeout=120)
    runs = calls.read_text().splitlines()
    assert len(runs) == 5                                        # dtd seed 1 was finished
    assert {line.split()[0] for line in runs} == {"gpu=0", "gpu=1"}
    assert swept.returncode == 1 and "2 runs failed" in swept.stderr and "3 done, 2 failed, 0 not started" in swept.stderr
    assert "[gpu " in swept.stdout


@pytest.mark.slow
def test_slurm_array_script_runs_its_line(tmp_path):
    runs = tmp_path / "runs.txt"
    runs.write_text(f"echo first > {tmp_path}/a\necho second > {tmp_path}/b\n")
    proc = subprocess.run(["bash", str(ROOT / "scripts/slurm_array.sh"), str(runs)],
                          env=dict(os.environ, SLURM_ARRAY_TASK_ID="2"), capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / "b").read_text() == "second\n" and not (tmp_path / "a").exists()
    proc = subprocess.run(["bash", str(ROOT / "scripts/slurm_array.sh"), str(runs)],
                          env=dict(os.environ, SLURM_ARRAY_TASK_ID="7"), capture_output=True, text=True)
    assert proc.returncode == 2 and "no line 7" in proc.stderr


# --------------------------------------------------------------------------- 12. dist_exact's shares
def test_share_rounding_is_probed(tiny_clip, monkeypatch):
    """The probe compares an image's trunk output inside each process's share with the same
    image inside the whole batch; a trunk whose last bits depend on the batch size is found."""
    from run.features import share_rounding
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = share_rounding(tiny_clip, [10, 2], 2, torch.device("cpu"), False)
        assert probe["exact"] and probe["share_sizes"] == [1, 5] and probe["global_batches"] == [2, 10]
        real = type(tiny_clip).encode_image
        monkeypatch.setattr(type(tiny_clip), "encode_image",
                            lambda self, x: tuple(t + 1e-7 * x.shape[0] for t in real(self, x)))
        probe = share_rounding(tiny_clip, [10], 2, torch.device("cpu"), False)
        assert not probe["exact"] and probe["max_difference"] > 0
    finally:
        torch.set_num_threads(threads)
