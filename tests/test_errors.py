"""Errors are one line and leave nothing half-written: full disks, library messages, --debug."""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, args_for, cli, one_line_error, run_dir


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


@pytest.mark.slow
def test_disk_full_while_caching_features(dtd, tmp_path, capsys, monkeypatch):
    from run import features

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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- a signal outside the training loop
PAUSED = """
import sys, time
sys.path.insert(0, {root!r})
import {module} as where
real = where.{name}
def paused(*args, **kwargs):
    print("paused", flush=True)
    time.sleep(60)
    return real(*args, **kwargs)
where.{name} = paused
import main
from utils import run_main
sys.exit(run_main(main.main, {argv!r}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("phase,module,name,sig", [
    ("the feature cache", "run.features.caches", "live_batches", signal.SIGTERM),
    ("the text classifier", "run.model", "text_classifier", signal.SIGINT),
    ("the baselines", "run.measure", "run_baselines", signal.SIGTERM)])
def test_every_phase_stops_on_a_signal_in_one_line_and_the_run_goes_on(dtd, tmp_path, capsys, phase, module, name,
                                                                         sig):
    argv = args_for(dtd, tmp_path, "--baselines", "[zero_shot]")
    proc = subprocess.Popen([sys.executable, "-c", PAUSED.format(root=str(ROOT), module=module, name=name, argv=argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "paused":
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (phase, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: stopped by {signal.Signals(sig).name}; run the same command") and \
        "Traceback" not in err, (phase, err)
    assert not list((tmp_path / "cache").rglob("*.tmp*")) if (tmp_path / "cache").exists() else True
    assert cli(argv, capsys)[0] == 0                              # the same command goes on and finishes
