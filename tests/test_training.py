"""Training runs that stop and resume: saved states, signals, kills, NaN losses, changed settings."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, args_for, cli, one_line_error, poison_loss_at, run_dir


# --------------------------------------------------------------------------- resume on another device
def test_a_state_saved_without_amp_resumes_with_amp_and_back():
    """A CPU run stores a disabled (empty) gradient scaler; loading it into an enabled one used to
    raise 'The source state dict is empty'."""
    import logging
    from run.training import restore_scaler
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_ctrl_c_saves_mid_epoch_and_the_rerun_matches_an_uninterrupted_run(dtd, tmp_path, capsys, monkeypatch,
                                                                           reference):
    from run import features
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- resume states that do not fit the run
RESUME_DAMAGE = {
    "an epoch past the run's": (lambda s: s["progress"].update(epoch=99), "its epoch 99"),
    "an epoch before the first": (lambda s: s["progress"].update(epoch=0), "its epoch 0"),
    "a position past the epoch": (lambda s: s["progress"].update(position=7), "its position 7"),
    "a step count that disagrees": (lambda s: s["progress"].update(step=1), "its step 1"),
    "a history of other epochs": (lambda s: s["progress"].update(history=[]), "its history has 0 rows"),
    "sums of other terms": (lambda s: s["progress"].update(sums={"loss": 1.0}), "loss sums"),
    "a NaN sum": (lambda s: s["progress"]["sums"].update(cls=float("nan")), "loss sums"),
    "a pool of another shape": (lambda s: s["pool"].update(positional_embedding=torch.zeros(3, 3)), "does not fit"),
    "a NaN pool": (lambda s: s["pool"].update({k: v * float("nan") for k, v in s["pool"].items()}), "NaN or infinite"),
    "an optimiser of another shape": (lambda s: next(iter(s["optimizer"]["state"].values())).update(
        exp_avg=torch.zeros(1)), "the optimiser's 'exp_avg' has shape"),
    "an RNG state of the wrong size": (lambda s: s.update(torch_rng=torch.zeros(3, dtype=torch.uint8)), "does not fit"),
    "a data order of another length": (lambda s: s["source"].update(order=torch.arange(5)), "data order"),
}


@pytest.mark.slow
def test_a_resume_state_that_does_not_fit_the_run_is_refused_and_nothing_is_reported(dtd, tmp_path, capsys,
                                                                                      monkeypatch):
    poison_loss_at(monkeypatch, 5)                                  # epoch 3, step 4: a state saved at epoch 3
    code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "0"), capsys)
    monkeypatch.undo()
    good = torch.load(run_dir(tmp_path) / "resume.pt", weights_only=True)
    failed = []
    for kind, (damage, fragment) in RESUME_DAMAGE.items():
        import copy
        state = copy.deepcopy(good)
        damage(state)
        torch.save(state, run_dir(tmp_path) / "resume.pt")
        code, _, err = cli(args_for(dtd, tmp_path, "--save_every", "0"), capsys)
        if not (code == 2 and err.count("\n") == 1 and "does not fit this run" in err and fragment in err
                and "--force" in err and not (run_dir(tmp_path) / "results.json").exists()):
            failed.append((kind, code, err))
    assert not failed, failed
    torch.save(good, run_dir(tmp_path) / "resume.pt")              # the state itself resumes
    assert cli(args_for(dtd, tmp_path, "--save_every", "0"), capsys)[0] == 0
