"""The CUDA tier: every branch that runs only on a CUDA device, run where one is present
(``python -m pytest -q -m cuda``; skipped with the reason everywhere else, CI included).

The branches and their tests:

| branch (where) | test |
|---|---|
| mixed precision, GradScaler (run/training.py), cuDNN autotuning (run/distributed.py) | test_a_demo_run_on_cuda_matches_the_cpu_run |
| bfloat16 autocast, no scaler; its refusal where unsupported | test_bfloat16_runs_or_is_refused_in_one_line |
| batched resize on the device under autocast (datasets/augment.py) | test_the_batched_resize_on_the_device_equals_the_cpu_one |
| pinned host buffers, asynchronous copies, the store writer's CUDA events (run/features/store.py) | test_the_feature_cache_built_on_cuda_equals_the_cpu_built_one |
| pinned labels and background prefetch of the training source (run/features/sources.py) | test_a_demo_run_on_cuda_matches_the_cpu_run |
| a checkpoint across devices (run/checkpoints.py, map_location) | test_a_checkpoint_moves_between_cpu_and_cuda |
| resume after SIGKILL on CUDA (the scaler's state in the resume file) | test_killed_on_cuda_the_rerun_ends_with_the_uninterrupted_result |
| float16_published on CUDA (clip/published.py) | test_the_published_float16_step_on_cuda |
| NCCL under torchrun (run/distributed.py) | test_torchrun_with_nccl_on_one_gpu_equals_the_plain_run |
| the profiler's kernel time (bench/bench_speed.py) | test_the_profilers_idle_share_is_a_share |
| Tip-Adapter's free-memory check (torch.cuda.mem_get_info) and every method on CUDA tensors | test_every_method_fits_on_cuda |
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, args_for, cli, run_dir

# RAFT_CUDA_TIER=cpu runs the tier's tests on the CPU: a dry run of their plumbing (the device
# script's --device cpu), which exercises none of the CUDA branches and claims nothing about them
GPU = "cpu" if os.environ.get("RAFT_CUDA_TIER") == "cpu" else "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(),
                                 reason="no CUDA device here (the CUDA tier runs where torch.cuda.is_available())")]

ACCURACY_POINTS = 5.0   # a 2-epoch run's accuracy, CUDA (mixed precision) vs CPU (float32), on 9 test images: one image


def results(folder):
    return json.loads((folder / "results.json").read_text())


def pool_of(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True, map_location="cpu")["pool"]


def test_a_demo_run_on_cuda_matches_the_cpu_run(dtd, tmp_path, capsys):
    settings = ("--train_epoch", "2", "--batch_size", "8")
    assert cli(args_for(dtd, tmp_path, *settings, "--device", "cpu"), capsys)[0] == 0
    cpu = run_dir(tmp_path)
    code, _, err = cli(args_for(dtd, tmp_path, *settings, "--device", GPU, "--output_dir", str(tmp_path / "gpu"),
                                "--cache_dir", str(tmp_path / "gpu_cache")), capsys)
    assert code == 0, err
    gpu = tmp_path / "gpu" / cpu.relative_to(tmp_path / "out")
    assert torch.backends.cudnn.benchmark or GPU == "cpu"
    a, b = results(cpu), results(gpu)
    assert abs(a["test_acc"] - b["test_acc"]) <= ACCURACY_POINTS + 1e-6
    assert abs(a["zero_shot_acc"] - b["zero_shot_acc"]) <= ACCURACY_POINTS + 1e-6
    p, q = pool_of(cpu), pool_of(gpu)
    for name in p:   # two epochs apart in float16 arithmetic: float16's rounding, relative to the tensor
        scale = p[name].abs().max().clamp_min(1e-3)
        assert ((p[name] - q[name]).abs().max() / scale) < 2e-2, name


def test_bfloat16_runs_or_is_refused_in_one_line(dtd, tmp_path, capsys):
    code, _, err = cli(args_for(dtd, tmp_path, "--train_epoch", "2", "--device", GPU, "--amp_dtype", "bfloat16"),
                       capsys)
    if GPU == "cpu" or torch.cuda.is_bf16_supported():   # (on the CPU amp is off: the option is accepted)
        assert code == 0, err
        assert results(run_dir(tmp_path))["test_acc"] >= 0
    else:
        assert code == 2 and "has no bfloat16 arithmetic" in err and len(err.strip().splitlines()) == 1


def test_the_batched_resize_on_the_device_equals_the_cpu_one():
    from datasets.augment import prepare_batch
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in ((97, 130), (224, 224),
                                                                                             (50, 300), (400, 90))]
    cpu = prepare_batch(images, 224, torch.Generator().manual_seed(1), torch.device("cpu"), batched=True)
    gpu = prepare_batch(images, 224, torch.Generator().manual_seed(1), torch.device(GPU))
    want = cpu.finish(torch.device("cpu"))
    assert (gpu.finish(torch.device(GPU), amp=False).cpu() - want).abs().max() < 1e-3
    # under autocast the two products run in float16: a normalised pixel to within float16's rounding
    assert (gpu.finish(torch.device(GPU), amp=True).cpu() - want).abs().max() < 5e-2


def test_the_feature_cache_built_on_cuda_equals_the_cpu_built_one(demo_root, tmp_path, tiny_clip):
    import numpy as np
    from datasets import read_coop_dataset
    from run.features import eval_store
    data = read_coop_dataset("demo", demo_root)
    stores = {}
    for name in ("cpu", GPU):
        clip = tiny_clip.to(name)
        stores[name] = eval_store(clip, data.test, tmp_path / name, "demo_test", 16, 0, torch.device(name), True)
    tiny_clip.to("cpu")
    maps_cpu, maps_gpu = (np.asarray(stores[n].maps, dtype=np.float32) for n in ("cpu", GPU))
    scale = np.abs(maps_cpu).max()
    assert np.abs(maps_cpu - maps_gpu).max() <= 2e-2 * scale        # float16 autocast and float16 storage
    assert np.array_equal(stores["cpu"].labels.numpy(), stores[GPU].labels.numpy())


def test_a_checkpoint_moves_between_cpu_and_cuda(dtd, tmp_path, capsys):
    settings = ("--train_epoch", "2")
    assert cli(args_for(dtd, tmp_path, *settings, "--device", "cpu"), capsys)[0] == 0
    trained_on_cpu = results(run_dir(tmp_path))
    code, _, err = cli(args_for(dtd, tmp_path, *settings, "--device", GPU, "--eval-only"), capsys)
    assert code == 0, err
    on_gpu = json.loads((run_dir(tmp_path) / "results_eval.json").read_text())
    assert abs(on_gpu["test_acc"] - trained_on_cpu["test_acc"]) <= ACCURACY_POINTS + 1e-6
    other = tmp_path / "other"
    code, _, err = cli(args_for(dtd, tmp_path, *settings, "--device", GPU, "--output_dir", str(other)), capsys)
    assert code == 0, err
    folder = other / run_dir(tmp_path).relative_to(tmp_path / "out")
    code, _, err = cli(args_for(dtd, tmp_path, *settings, "--device", "cpu", "--eval-only", "--output_dir",
                                str(other)), capsys)
    assert code == 0, err
    assert abs(json.loads((folder / "results_eval.json").read_text())["test_acc"] - results(folder)["test_acc"]) \
        <= ACCURACY_POINTS + 1e-6


def test_killed_on_cuda_the_rerun_ends_with_the_uninterrupted_result(dtd, tmp_path):
    argv = [sys.executable, str(ROOT / "main.py"), *args_for(dtd, tmp_path, "--save_every", "0", "--train_epoch", "8",
                                                             "--device", GPU)]
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    expected = {k: results(run_dir(tmp_path))[k] for k in ("test_acc", "alpha", "val_acc")}
    import shutil
    shutil.rmtree(tmp_path / "out")
    log = run_dir(tmp_path) / "log.txt"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (not log.exists() or log.read_text().count("training state saved") < 3):
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert {k: results(run_dir(tmp_path))[k] for k in expected} == expected


def test_the_published_float16_step_on_cuda(dtd, tmp_path, capsys):
    code, _, err = cli(args_for(dtd, tmp_path, "--train_epoch", "2", "--device", GPU, "--pool_precision",
                                "float16_published"), capsys)
    assert code == 0, err
    r = results(run_dir(tmp_path))
    assert r["numerics"]["pool_precision"] == "float16_published" and r["test_acc"] >= 0


def test_torchrun_with_nccl_on_one_gpu_equals_the_plain_run(dtd, tmp_path, capsys):
    settings = ("--train_epoch", "2", "--device", GPU)
    assert cli(args_for(dtd, tmp_path, *settings), capsys)[0] == 0
    plain = {k: results(run_dir(tmp_path))[k] for k in ("test_acc", "alpha", "val_acc")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ROOT / "main.py"),
           *args_for(dtd, tmp_path, *settings, "--output_dir", str(tmp_path / "nccl"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "nccl" / run_dir(tmp_path).relative_to(tmp_path / "out")
    assert {k: results(folder)[k] for k in plain} == plain


def test_the_profilers_idle_share_is_a_share():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_speed import device_idle_share
    x = torch.randn(512, 512, device=GPU)
    share = device_idle_share(lambda: [x @ x for _ in range(10)], torch.device(GPU), 0.5)
    assert 0.0 <= share <= 1.0


def test_every_method_fits_on_cuda():
    import logging
    from dataclasses import replace
    from baselines import METHODS, run_baselines
    sys.path.insert(0, str(ROOT / "tests"))
    from test_baselines import clustered, with_everything
    from baselines import BaselineData
    train, labels = clustered(4, seed=1)
    val, val_labels = clustered(3, seed=2)
    test, test_labels = clustered(5, seed=3)
    views = torch.nn.functional.normalize(train + 0.2 * torch.randn(10, *train.shape), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(32, 6), dim=0)
    data = with_everything(BaselineData(text, train, labels, views, val, val_labels, 100.0, 1), test)
    cuda = torch.device(GPU)
    moved = replace(data, text=data.text.to(cuda), train=data.train.to(cuda), train_labels=data.train_labels.to(cuda),
                    views=data.views.to(cuda), val=data.val.to(cuda), val_labels=data.val_labels.to(cuda),
                    raw={k: v.to(cuda) for k, v in data.raw.items()},
                    pre={k: v.to(cuda) if isinstance(v, torch.Tensor) else v for k, v in data.pre.items()})
    out = run_baselines(list(METHODS), moved, {"test_acc": (test.to(cuda), test_labels.to(cuda), None)},
                        logging.getLogger("test"))
    assert {name: r for name, r in out.items() if "test_acc" not in r} == {}
