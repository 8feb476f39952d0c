"""Never lose a run, never hang, explain every bad input (clear one-line errors, resume, atomic files)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SPLIT, args_for, cli, one_line_error, poison_loss_at, run_dir


# --------------------------------------------------------------------------- bad inputs
def break_split(root, how):
    path = root / SPLIT
    data = json.loads(path.read_text())
    if how == "missing":
        path.unlink()
    elif how == "not json":
        path.write_text('{"train": [')
    elif how == "row shape":
        data["train"][2] = ["x.jpg", 0]
        path.write_text(json.dumps(data))
    elif how == "label range":
        data["test"][0][1] = 7
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("how,fragments", [
    ("missing", ["split file missing", SPLIT]),
    ("not json", ["is not valid JSON"]),
    ("row shape", ["train[2]", "not [image_path, label, classname]"]),
    ("label range", ["labels must be 0..C-1"]),
])
def test_broken_split_files(dtd, tmp_path, capsys, how, fragments):
    break_split(dtd, how)
    one_line_error(*cli(args_for(dtd, tmp_path), capsys)[::2], *fragments)


def test_class_count_disagreeing_with_the_config(dtd, tmp_path, capsys):
    one_line_error(*cli(args_for(dtd, tmp_path, "--num_classes", "5"), capsys)[::2], "num_classes=5", "has 3 classes")


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    elif how == "not an image":
        path.write_text("this is text, not a JPEG")


@pytest.mark.parametrize("how,reason", [("missing", "file not found"), ("empty", "empty file"),
                                        ("truncated", "truncated"), ("not an image", "not an image")])
def test_unreadable_training_image_fails_before_training(dtd, tmp_path, capsys, how, reason):
    from datasets import few_shot, read_coop_dataset
    victim = Path(few_shot(read_coop_dataset("dtd", dtd).train, 4, 1, 3)[5].path)
    damage(victim, how)
    code, _, err = cli(args_for(dtd, tmp_path, "--calibrate_bn", "false"), capsys)
    one_line_error(code, err, "unreadable training image", str(victim), reason)
    assert not (run_dir(tmp_path) / "checkpoint.pt").exists()
    log = (run_dir(tmp_path) / "log.txt").read_text()
    assert "epoch   1/" not in log                      # stopped before any training step


def test_unreadable_test_image_fails_or_is_skipped_and_counted(dtd, tmp_path, capsys):
    victim = dtd / "images" / "blue_square" / json.loads((dtd / SPLIT).read_text())["test"][3][0].split("/")[1]
    damage(victim, "truncated")
    code, _, err = cli(args_for(dtd, tmp_path), capsys)
    one_line_error(code, err, "unreadable image", str(victim), "bad_images: skip")
    code, _, err = cli(args_for(dtd, tmp_path, "--bad_images", "skip"), capsys)
    assert code == 0, err
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert results["skipped_images"] == {"val": 0, "test": 1} and results["sizes"]["test"] == 8
    assert str(victim) in results["skipped_files"]["test"][0]


@pytest.mark.parametrize("content,fragments", [
    ("dataset: dtd\n  data_path: [oops\n", ["not valid YAML"]),
    ("dataset: dtd\ndata_path: x\nlearning_rate: 0.1\n", ["unknown config key 'learning_rate'", "did you mean"]),
    ("dataset: dtd\ndata_path: x\nbatch_size: many\n", ["'batch_size' expects int"]),
    ("dataset: dtd\ndata_path: x\nshots: 0\n", ["'shots' must be > 0"]),
    ("dataset: dtd\ndata_path: x\nlr: -0.1\n", ["'lr' must be > 0"]),
    ("dataset: dtd\ndata_path: x\nsearch_low: 1\nsearch_high: 0\n", ["empty alpha search range"]),
    ("dataset: dtd\ndata_path: x\nbad_images: ignore\n", ["'bad_images' must be 'fail' or 'skip'"]),
])
def test_bad_config_files(tmp_path, capsys, content, fragments):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    one_line_error(*cli(["--config", str(cfg)], capsys)[::2], *fragments)


def test_description_files(dtd, tmp_path, capsys):
    desc = tmp_path / "desc.json"
    desc.write_text("{not json")
    one_line_error(*cli(args_for(dtd, tmp_path, "--descriptions", str(desc)), capsys)[::2], "not valid JSON")
    desc.write_text(json.dumps({"red circle": ["a red disc.", "a round red shape."], "blue square": []}))
    code, out, err = cli(args_for(dtd, tmp_path, "--descriptions", str(desc)), capsys)
    assert code == 0, err
    assert "no usable sentences for blue square, green triangle" in out and "using templates" in out


def test_bad_checkpoints(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    good = run_dir(tmp_path) / "checkpoint.pt"
    evaluate = lambda path, *extra: cli(args_for(dtd, tmp_path, "--eval-only", "--checkpoint", str(path), *extra),
                                        capsys)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    one_line_error(*evaluate(truncated)[::2], "cannot read checkpoint", str(truncated))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    one_line_error(*evaluate(text)[::2], "cannot read checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    one_line_error(*evaluate(plain)[::2], "not a RAFT checkpoint")
    ckpt = torch.load(good, weights_only=True)
    other = tmp_path / "other_backbone.pt"
    torch.save(ckpt | {"backbone": "RN101"}, other)
    one_line_error(*evaluate(other)[::2], "trained with backbone RN101", "this run uses tiny-rn")
    fewer = tmp_path / "other_classes.pt"     # a consistent 5-class checkpoint
    text = ckpt["text"]
    torch.save(ckpt | {"num_classes": 5, "classnames": ckpt["classnames"] + ["x", "y"],
                       "text": torch.cat([text[:, :-1], text[:, :2], text[:, -1:]], 1)}, fewer)
    one_line_error(*evaluate(fewer)[::2], "trained for 5 classes", "has 3")
    pickled = tmp_path / "pickled.pt"
    torch.save({"pool": ckpt["pool"], "config": ckpt["config"], "extra": Path("x")}, pickled)
    one_line_error(*evaluate(pickled)[::2], "refusing to load", "pickled Python code")


def test_bad_backbone_and_weights(dtd, tmp_path, capsys):
    one_line_error(*cli(args_for(dtd, tmp_path, "--backbone", "RN42"), capsys)[::2], "unknown backbone 'RN42'",
                   "(did you mean ", "RN50")
    one_line_error(*cli(args_for(dtd, tmp_path, "--backbone", "RN50", "--weights", str(tmp_path / "no.pt")),
                        capsys)[::2], "weights file not found")


def test_debug_flag_shows_the_traceback(dtd, tmp_path, capsys):
    with pytest.raises(Exception, match="unknown backbone"):
        cli(args_for(dtd, tmp_path, "--backbone", "RN42", "--debug"), capsys)


# --------------------------------------------------------------------------- full disk
def no_stray_files(folder: Path):
    leftovers = [p for p in folder.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def test_disk_full_while_writing_the_checkpoint(dtd, tmp_path, capsys, monkeypatch):
    import utils
    real_fsync = os.fsync

    def full_disk_fsync(fd):  # the data went to the page cache; the disk refuses it at fsync
        if os.fstat(fd).st_size > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(utils.os, "fsync", full_disk_fsync)
    code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "1e9"), capsys)
    one_line_error(code, err, "no space left on device")
    assert not (run_dir(tmp_path) / "checkpoint.pt").exists() and not (run_dir(tmp_path) / "results.json").exists()
    no_stray_files(tmp_path)


def test_disk_full_while_caching_features(dtd, tmp_path, capsys, monkeypatch):
    import features

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(features.store.os, "posix_fallocate", no_space)
    code, _, err = cli(args_for(dtd, tmp_path), capsys)
    one_line_error(code, err, "no space left on device")
    assert not (run_dir(tmp_path) / "results.json").exists()
    assert (run_dir(tmp_path) / "checkpoint.pt").is_file()     # training's result is kept
    assert not list((tmp_path / "cache" / "features").iterdir())
    monkeypatch.undo()
    code, _, err = cli(args_for(dtd, tmp_path), capsys)      # space again: evaluates the checkpoint
    assert code == 0, err
    assert "training already finished" in (run_dir(tmp_path) / "log.txt").read_text()


def test_a_real_full_filesystem(dtd, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs privileges)")
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *args_for(dtd, tmp_path, "--output_dir",
                                                                                str(mount))],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "no space left on device" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        no_stray_files(mount)
        for p in mount.rglob("*.pt"):
            torch.load(p, weights_only=True)   # whatever exists is complete
    finally:
        subprocess.run(["umount", str(mount)])


# --------------------------------------------------------------------------- NaN, resume, interrupts
def results_of(tmp_path):
    r = json.loads((run_dir(tmp_path) / "results.json").read_text())
    return {k: r[k] for k in ("test_acc", "zero_shot_acc", "finetuned_acc", "alpha", "val_acc")}, r


@pytest.fixture()
def reference(dtd, tmp_path, capsys):
    """The uninterrupted run's numbers (then its folder is cleared for the run under test)."""
    code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "0"), capsys)
    assert code == 0, err
    numbers, _ = results_of(tmp_path)
    shutil.rmtree(tmp_path / "out")
    return numbers


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_state(dtd, tmp_path, capsys, monkeypatch,
                                                                           reference):
    poison_loss_at(monkeypatch, 5)                                  # epoch 3, step 4
    code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "0"), capsys)
    one_line_error(code, err, "loss became nan at epoch 3, step 4", "resume.pt")
    state = torch.load(run_dir(tmp_path) / "resume.pt", weights_only=True)
    assert state["progress"]["epoch"] == 3 and state["progress"]["step"] == 4
    monkeypatch.undo()
    code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "0"), capsys)
    assert code == 0, err
    assert results_of(tmp_path)[0] == reference
    assert not (run_dir(tmp_path) / "resume.pt").exists()


def test_ctrl_c_saves_mid_epoch_and_the_rerun_matches_an_uninterrupted_run(dtd, tmp_path, capsys, monkeypatch,
                                                                           reference):
    import features
    real_epoch, sent = features.LiveSource.epoch, []

    def epoch_with_ctrl_c(self, epoch, start=0):
        for i, batch in enumerate(real_epoch(self, epoch, start)):
            if epoch == 2 and i == 0 and not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)        # delivered while this batch trains
            yield batch

    monkeypatch.setattr(features.LiveSource, "epoch", epoch_with_ctrl_c)
    code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "1e9"), capsys)
    assert code == 130 and "stopped by SIGINT at epoch 2, step 3" in err and "Traceback" not in err
    state = torch.load(run_dir(tmp_path) / "resume.pt", weights_only=True)
    assert state["progress"]["position"] == 1                      # inside epoch 2
    monkeypatch.undo()
    code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "1e9"), capsys)
    assert code == 0, err
    assert "resuming from" in (run_dir(tmp_path) / "log.txt").read_text()
    assert results_of(tmp_path)[0] == reference


def test_resume_refuses_changed_settings_unless_forced(dtd, tmp_path, capsys, monkeypatch):
    poison_loss_at(monkeypatch, 3)
    cli(args_for(dtd, tmp_path, "--save_every", "0"), capsys)
    monkeypatch.undo()
    code, _, err = cli(args_for(dtd, tmp_path, "--lambda1", "0.3"), capsys)
    one_line_error(code, err, "an unfinished run with other settings", "lambda1: 0.1 -> 0.3", "--force")
    code, _, err = cli(args_for(dtd, tmp_path, "--lambda1", "0.3", "--force"), capsys)
    assert code == 0, err


# --------------------------------------------------------------------------- fault injection
def readable_outputs(folder: Path) -> None:
    """Every file a run leaves is complete: JSON parses, checkpoints load, YAML parses."""
    import yaml
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".npy":
            import numpy as np
            np.load(path, mmap_mode="r")


def test_killed_at_random_moments_every_rerun_ends_with_the_uninterrupted_result(dtd, tmp_path):
    """SIGKILL at seeded random moments — some at random times (start-up, caching, evaluation
    included), some a random instant after a random number of saved training states (so
    that kills land inside training) — several times over. No output file may ever be
    unreadable, and the final numbers must equal an uninterrupted run's."""
    import random
    import time
    argv = [sys.executable, str(ROOT / "main.py"), *args_for(dtd, tmp_path, "--save_every", "0",
                                                             "--train_epoch", "12")]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    duration = time.perf_counter() - start
    expected, _ = results_of(tmp_path)
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(tmp_path / "cache")
    log = run_dir(tmp_path) / "log.txt"
    saves = lambda: log.read_text().count("training state saved") if log.exists() else 0  # noqa: E731
    rng = random.Random(1234)
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt % 2 == 0:      # a random instant after 1-3 more saved states
            target = saves() + rng.randint(1, 3)
            while proc.poll() is None and saves() < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.03))
        else:                     # a random moment of the whole run
            time.sleep(rng.uniform(0.1, 0.9) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        readable_outputs(tmp_path)
        if (run_dir(tmp_path) / "results.json").exists():
            break
    final = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    readable_outputs(tmp_path)
    assert kills >= 3
    assert log.read_text().count("resuming from") >= 2
    assert results_of(tmp_path)[0] == expected


def test_library_errors_with_empty_or_long_messages_stay_one_line(tmp_path, monkeypatch):
    """Every place that quotes a library's error quotes its first line through one helper: an
    empty message (a bare ``OSError()``) is named by its type, not an IndexError's traceback."""
    from PIL import Image

    from datasets.loader import UnreadableImage, read_rgb
    from run.checkpoints import load_pool_state
    from utils import RaftError, first_line
    assert first_line(OSError()) == "OSError" and first_line(ValueError("\n")) == "ValueError"
    assert first_line(ValueError("first\nsecond")) == "first"
    assert first_line(ValueError("word " * 100), 30) == "word word word word word word …"
    image = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(image)

    def bare_error(*args, **kwargs):
        raise OSError()
    monkeypatch.setattr(Image, "open", bare_error)
    with pytest.raises(UnreadableImage, match=r"corrupt or truncated \(OSError\)"):
        read_rgb(str(image))

    class Pool(torch.nn.Module):
        def load_state_dict(self, *args, **kwargs):
            raise RuntimeError("")
    with pytest.raises(RaftError, match="does not fit this region pool: RuntimeError"):
        load_pool_state(Pool(), {"pool": {}}, tmp_path / "ck.pt")
