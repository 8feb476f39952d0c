"""What a new user's first real run hits: many images, offline weights, foreign checkpoints,
colliding experiments, sweeps, devices, mixed-precision overflow (issue: the first real run)."""
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, args_for, cli, one_line_error, run_dir
from utils import RaftError


# --------------------------------------------------------------------------- many images, few descriptors
@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(1600):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{i:05d}.jpg", quality=80)
    return root


DECODE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    import torch
    from datasets.base import Datum
    from features import LiveSource
    from clip.backbone import FrozenCLIP, load_open_clip
    items = [Datum(str(p), i % 4, "c") for i, p in enumerate(sorted(Path({images!r}).glob("*.jpg")))]
    clip = FrozenCLIP(load_open_clip("tiny-rn", None), "tiny-rn")
    source = LiveSource(clip, items, batch_size=64, seed=1, device=torch.device("cpu"), amp=False, num_workers=2)
    print("decoded", len(source.images))
""")


def test_thousands_of_training_images_under_a_low_descriptor_limit(many_images, tmp_path):
    """Decoded images live in ordinary memory: no descriptor (nor /dev/shm segment) per image."""
    script = tmp_path / "decode.py"
    script.write_text(DECODE.format(root=str(ROOT), images=str(many_images)))

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          preexec_fn=low_limit)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decoded 1600" in proc.stdout


def test_thousands_of_training_images_with_a_tiny_dev_shm(many_images, tmp_path):
    """Docker's default /dev/shm is 64 MB; here 1 MB, in a private mount namespace."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small /dev/shm")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("mount namespaces are not available here")
    script = tmp_path / "decode.py"
    script.write_text(DECODE.format(root=str(ROOT), images=str(many_images)))
    cmd = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && {sys.executable} {script}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decoded 1600" in proc.stdout


# --------------------------------------------------------------------------- resume on another device
def test_a_state_saved_without_amp_resumes_with_amp_and_back():
    """A CPU run stores a disabled (empty) gradient scaler; loading it into an enabled one used to
    raise 'The source state dict is empty'."""
    import logging
    from training import restore_scaler
    log = logging.getLogger("test")
    off = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    on = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(off)    # what happened before
    restore_scaler(on, off, log)
    assert on.get_scale() == 2.0 ** 16                                     # a fresh scale
    saved_on = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0).state_dict()
    restore_scaler(torch.amp.GradScaler("cpu", enabled=False), saved_on, log)
    again = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(again, saved_on, log)
    assert again.get_scale() == 1024.0


# --------------------------------------------------------------------------- checkpoints of other datasets
def folder_copy(dtd: Path, dest: Path, classes=("red_circle", "blue_square", "green_triangle")) -> Path:
    for name in classes:
        shutil.copytree(dtd / "images" / name, dest / name)
    return dest


def test_a_checkpoint_of_another_dataset_never_replaces_its_results(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    source = run_dir(tmp_path)
    before = (source / "results.json").read_text()
    # the my_birds scenario: a folder dataset with as many classes, evaluated with the dtd pool
    birds = folder_copy(dtd, tmp_path / "my_birds")
    argv = ["--config", str(ROOT / "configs/folder.yaml"), "--data_path", str(birds), "--eval-only",
            "--checkpoint", str(source / "checkpoint.pt"), "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    assert (source / "results.json").read_text() == before
    assert not (source / "results_eval.json").exists()
    transfer = json.loads((source / "transfer_my_birds.json").read_text())
    assert transfer["dataset"] == "my_birds" and transfer["source"]["dataset"] == "dtd"
    assert transfer["alpha"] == json.loads(before)["alpha"]       # the source run's alpha, not a target choice
    assert "dtd -> my_birds" in out


def test_same_dataset_with_other_class_names_is_refused(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    split = json.loads((dtd / "split_zhou_DescribableTextures.json").read_text())
    for rows in split.values():
        for row in rows:
            row[2] = row[2].replace("blue square", "navy square")
    (dtd / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    code, _, err = cli(args_for(dtd, tmp_path, "--eval-only"), capsys)
    one_line_error(code, err, "trained on other classes", "'blue square' there, 'navy square' here")


def test_eval_only_takes_backbone_weights_and_classes_from_the_checkpoint(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    ckpt = run_dir(tmp_path) / "checkpoint.pt"
    argv = ["--config", str(ROOT / "configs/dtd.yaml"), "--data_path", str(dtd), "--eval-only", "--checkpoint",
            str(ckpt), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]   # the YAML says RN50, 47
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    evaluated = json.loads((run_dir(tmp_path) / "results_eval.json").read_text())
    assert evaluated["backbone"] == "tiny-rn" and evaluated["weights"] is None
    code, _, err = cli([*argv, "--backbone", "RN101"], capsys)
    one_line_error(code, err, "trained with backbone tiny-rn", "this run uses RN101")


# --------------------------------------------------------------------------- experiments do not collide
def test_other_training_settings_get_their_own_run_folder(dtd, tmp_path, capsys):
    import yaml
    settings = args_for(dtd, tmp_path)[2:-2]                           # --key value pairs, without --name ""
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"dataset": "dtd", **{k[2:]: yaml.safe_load(v) for k, v in
                                                           zip(settings[::2], settings[1::2])}}))
    out = tmp_path / "out" / "dtd"
    assert cli(["--config", str(config)], capsys)[0] == 0
    assert [p.name for p in out.iterdir()] == ["tiny-rn_4shots_seed1"]   # the config's own settings: plain name
    assert cli(["--config", str(config), "--lr", "2e-4", "--lambda2", "1.0"], capsys)[0] == 0
    other = "tiny-rn_4shots_seed1_lr=0.0002_lambda2=1"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-rn_4shots_seed1", other]
    code, text, _ = cli(["--config", str(config), "--lambda2", "1.0", "--lr", "2e-4"], capsys)
    assert code == 0 and "already finished" in text and other in text      # any argument order: the same run
    # the run folder's own config.yaml reproduces its folder name: the rerun finds it finished
    code, text, _ = cli(["--config", str(out / other / "config.yaml")], capsys)
    assert code == 0 and "already finished" in text and other in text
    # an explicit tag replaces the automatic one
    assert cli(["--config", str(config), "--lr", "2e-4", "--name", "warmer"], capsys)[0] == 0
    assert (out / "tiny-rn_4shots_seed1_warmer" / "results.json").is_file()
    # many changed settings: the first ones, and a hash of all of them
    code, text, _ = cli(["--config", str(config), "--lr", "2e-4", "--lambda1", "0.2", "--lambda2", "0.7",
                         "--tau1", "1.5", "--tau2", "2.5", "--eps", "1e-5", "--weight_decay", "0.02"], capsys)
    assert code == 0
    long = [p.name for p in out.iterdir() if "more-" in p.name]
    assert len(long) == 1 and len(long[0]) < 100 and "lr=0.0002" in long[0]
    # summarize keeps the settings apart
    code, text, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="summarize")
    assert code == 0 and "RAFT, tiny-rn_lr=0.0002_lambda2=1: 1 run\n" in text and "tiny-rn_warmer" in text


def test_a_checkpoint_with_other_settings_names_them(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    (run_dir(tmp_path) / "results.json").unlink()                      # trained, results lost
    code, _, err = cli(args_for(dtd, tmp_path, "--tau1", "1.5"), capsys)
    one_line_error(code, err, "was trained with other settings", "tau1: 2.0 -> 1.5", "--force")


def test_reference_imagenet_batch_at_one_shot_keeps_the_plain_folder_name():
    from run.config import Config, parse_args
    from run.folders import run_name, run_tag
    cfg, flags = parse_args(["--config", str(ROOT / "configs/imagenet.yaml"), "--shots", "1"], "t")
    assert cfg.batch_size == 64
    named = Config(dict(cfg) | {"name": run_tag(cfg, flags)})
    assert run_name(named) == "RN50_1shots_seed1"
    cfg, _ = parse_args(["--config", str(ROOT / "configs/imagenet.yaml"), "--shots", "1", "--batch_size", "32"], "t")
    assert cfg.batch_size == 32                                          # the command line wins


# --------------------------------------------------------------------------- the audit trail
def test_results_record_the_split_files_and_sizes(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    split = results["split"]
    import hashlib
    path = dtd / "split_zhou_DescribableTextures.json"
    assert split["files"] == [{"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert split["sizes"] == {"train": 18, "val": 6, "test": 9}
    assert results["sizes"]["train"] == 12                              # the few-shot sample beside it


# --------------------------------------------------------------------------- folders and validation draws
def test_data_path_dot_is_named_after_the_folder_and_output_stays_out(dtd, tmp_path, capsys, monkeypatch):
    data = folder_copy(dtd, tmp_path / "my_shapes")
    monkeypatch.chdir(data)
    code, _, err = cli(["--config", str(ROOT / "configs/folder.yaml"), "--data_path", "."], capsys)
    one_line_error(code, err, "is inside the dataset folder", "run from another folder")
    assert sorted(p.name for p in data.iterdir()) == ["blue_square", "green_triangle", "red_circle"]
    from datasets import read_folder_dataset
    assert read_folder_dataset(".", [0.5, 0.2, 0.3], 1, tmp_path / "cache").name == "my_shapes"


def test_validation_draw_without_replacement_and_its_own_error():
    from datasets import validation_from_train
    from datasets.base import Datum
    train = [Datum(f"{c}{i}.jpg", label, c) for label, (c, n) in enumerate((("a", 10), ("b", 3))) for i in range(n)]
    val = validation_from_train(train, 4, 1, ["a", "b"], taken={"b0.jpg"})
    paths = [d.path for d in val]
    assert len(paths) == len(set(paths)) == 6 and "b0.jpg" not in paths    # b gives the 2 it has left
    with pytest.raises(RaftError, match="the validation draw failed: class 'b'"):
        validation_from_train(train, 4, 1, ["a", "b"], taken={"b0.jpg", "b1.jpg", "b2.jpg"})


# --------------------------------------------------------------------------- offline weights
@pytest.fixture()
def silent_hub():
    """A loopback 'hub' that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_openai_weights_offline_fail_fast_in_one_line(tmp_path, demo_root):
    """No hub (a refused connection): one line on stderr, none of the libraries' log lines."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"),
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("HF_HUB_OFFLINE", None)
    argv = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/demo.yaml"), "--data_path",
            str(demo_root), "--num_classes", "4", "--backbone", "RN50", "--weights", "openai",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download OpenAI's RN50 weights"), proc.stderr
    assert "cannot be reached" in lines[0] and lines[0].endswith("(doc/weights.md)")


def test_an_unanswering_hub_times_out_in_seconds(silent_hub, tmp_path, monkeypatch):
    from clip import weights as backbone
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone, "HUB_TIMEOUT", 1.0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(backbone, "cached_tag_file", lambda name, tag: None)   # not cached
    start = time.perf_counter()
    with pytest.raises(RaftError, match="cannot be reached"):
        backbone.load_open_clip("RN50", "openai")
    assert time.perf_counter() - start < 10
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RaftError, match="HF_HUB_OFFLINE is set"):
        backbone.load_open_clip("RN50", "openai")


def test_cached_openai_weights_are_found_without_the_network(tmp_path, monkeypatch):
    from clip import weights as backbone
    cached = tmp_path / "xdg" / "clip" / "RN50.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backbone.openai_weights_file("RN50") == cached                 # the clip package's download
    hub = tmp_path / "hf" / "hub" / "models--timm--resnet101_clip.openai"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc")
    (hub / "snapshots" / "abc").mkdir(parents=True)
    (hub / "snapshots" / "abc" / "open_clip_model.safetensors").write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    found = backbone.openai_weights_file("RN101")
    assert found is not None and found.name == "open_clip_model.safetensors"


def test_a_foreign_state_dict_names_the_mismatch(tmp_path, tiny_clip):
    from clip.backbone import load_open_clip
    path = tmp_path / "tiny_state.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    with pytest.raises(RaftError, match=r"does not hold RN50 weights: .*shape mismatches \(first: "):
        load_open_clip("RN50", str(path))


# --------------------------------------------------------------------------- devices and mixed precision
def test_cuda_device_index_is_checked_and_made_current(monkeypatch):
    from utils import resolve_device
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(i))
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [1]
    with pytest.raises(RaftError, match=r"device 'cuda:7' does not exist: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:7")
    with pytest.raises(RaftError, match="is not a device name"):
        resolve_device("gpu0")


def test_float16_overflow_under_amp_stops_once_with_the_fix(tiny_clip, tmp_path):
    from features import build_store
    calls = []

    def batches(skipped):   # what the trunk returns under autocast when it overflows
        calls.append(1)
        yield torch.full((2, 256, 3, 3), float("inf"), dtype=torch.float16), torch.zeros(2, 64), torch.tensor([0, 1])

    with pytest.raises(RaftError, match="overflow float16 under mixed precision.*--amp false"):
        build_store(tmp_path / "s", {"key": "k"}, 2, batches, tiny_clip, "s")
    assert calls == [1] and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- sweeps
def test_sweep_runs_past_failures_lists_them_and_honours_python_and_data(tmp_path):
    fake = tmp_path / "fakepy"
    log = tmp_path / "calls.txt"
    fake.write_text(f"#!/usr/bin/env bash\nif [[ \"$1\" == *pending.py ]]; then exec {sys.executable} \"$@\"; fi\n"
                    f"echo \"$@\" >> {log}\n[[ \"$*\" == *\"--seed 1\"* ]] && exit 2\nexit 0\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), DATA="/data/root")
    proc = subprocess.run(["bash", str(ROOT / "scripts/sweep.sh"), "dtd eurosat", "4", "1 2", "--lr", "2e-4"],
                          env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert len(calls) == 4                                               # every run was tried
    assert all("--data_path /data/root/dtd" in c for c in calls[:2]) and "/data/root/eurosat" in calls[2]
    assert all(c.endswith("--lr 2e-4") for c in calls)
    assert proc.returncode == 1
    assert "2 runs failed" in proc.stderr and "--config configs/dtd.yaml --shots 4 --seed 1" in proc.stderr


# --------------------------------------------------------------------------- docs that drift
def test_every_config_folder_is_in_the_datasets_table():
    import yaml
    table = (ROOT / "doc" / "datasets.md").read_text()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("dataset") in (None, "folder", "demo"):
            continue
        assert f"`{cfg['data_path']}`" in table, (path.name, cfg["data_path"])
        assert "METHOD.md" not in path.read_text()                         # cites doc/method.md, in the repo


def test_example_blocks_exist_for_the_regeneration_script():
    script = (ROOT / "doc" / "examples" / "regenerate.py").read_text()
    import re
    for doc, name in re.findall(r'ROOT / "([^"]+\.md)", "([\w-]+)"', script):
        assert f"<!-- example:{name} -->" in (ROOT / doc).read_text(), (doc, name)
