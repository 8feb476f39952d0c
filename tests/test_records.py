"""What a run records and says (issue: a week of experiments): the training curve, provenance,
errors in the run's log, progress off a terminal, setup lines once, the docs' demo time."""
import csv
import json
import re

import pytest

from conftest import ROOT, args_for, cli, run_dir


def test_a_run_records_its_curve_and_its_provenance(dtd, tmp_path, capsys):
    code, out, _ = cli(args_for(dtd, tmp_path, "--baselines", "[]"), capsys)
    assert code == 0
    folder = run_dir(tmp_path)
    rows = list(csv.DictReader((folder / "history.csv").open()))
    results = json.loads((folder / "results.json").read_text())
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and len(results["history"]) == 3
    assert all(float(r["seconds"]) > 0 and float(r["lr"]) >= 0 for r in rows)
    assert float(rows[0]["loss"]) == pytest.approx(results["history"][0]["loss"])
    p = results["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", p["git_commit"] or "0" * 40) and isinstance(p["git_dirty"], (bool, type(None)))
    assert {"torch", "torchvision", "open_clip", "numpy", "torch_threads", "device_name", "command"} <= set(p)
    # every setup line once (the text classifier was logged twice before)
    log = (folder / "log.txt").read_text()
    assert log.count("class descriptions:") == 1 and log.count("text classifier:") == 1
    # per epoch: seconds and an estimate of the rest, in the log a batch job keeps
    assert re.search(r"epoch   1/3 .* \d+\.\ds, about \S+ left", log)
    # a re-evaluation of the finished checkpoint keeps the curve (the checkpoint carries it)
    (folder / "results.json").unlink()
    assert cli(args_for(dtd, tmp_path, "--baselines", "[]"), capsys)[0] == 0
    assert len(json.loads((folder / "results.json").read_text())["history"]) == 3


def test_errors_reach_the_runs_log(dtd, tmp_path, capsys, monkeypatch):
    from conftest import poison_loss_at
    poison_loss_at(monkeypatch, 2)
    code, _, err = cli(args_for(dtd, tmp_path, "--baselines", "[]"), capsys)
    assert code == 2 and "loss became nan" in err
    assert "error: loss became nan" in (run_dir(tmp_path) / "log.txt").read_text()


def test_tensorboard_is_optional_and_says_what_is_missing(dtd, tmp_path, capsys):
    from conftest import one_line_error
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        code, _, err = cli(args_for(dtd, tmp_path, "--baselines", "[]", "--tensorboard", "true"), capsys)
        one_line_error(code, err, "tensorboard: true needs the tensorboard package (pip install tensorboard)")
        assert not (run_dir(tmp_path) / "checkpoint.pt").exists()
        return
    assert cli(args_for(dtd, tmp_path, "--baselines", "[]", "--tensorboard", "true"), capsys)[0] == 0
    assert list((run_dir(tmp_path) / "tensorboard").glob("events.out.tfevents.*"))


def test_feature_progress_off_a_terminal(monkeypatch, caplog):
    import logging
    import sys
    from run.features.store import Progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("raft")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        progress = Progress("features: dtd_test", 1692, every=0.0)
        progress.add(128)
        progress.add(128)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == ["features: dtd_test: 128/1692 images", "features: dtd_test: 256/1692 images"]


def test_the_demo_time_is_the_same_in_the_readme_and_the_config():
    readme = (ROOT / "README.md").read_text()
    config = (ROOT / "configs" / "demo.yaml").read_text()
    said = re.search(r"About (\d+) s on a 2-core CPU", config).group(1)
    assert f"in about {said} seconds on an idle 2-core machine" in readme
    measured = re.search(r"measured on a 2-core CPU, (\d+) s wall-clock", readme).group(1)
    assert abs(int(measured) - int(said)) <= 2


# --------------------------------------------------------------------------- the audit trail
@pytest.mark.slow
def test_results_record_the_split_files_and_sizes(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    split = results["split"]
    import hashlib
    path = dtd / "split_zhou_DescribableTextures.json"
    assert split["files"] == [{"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert split["sizes"] == {"train": 18, "val": 6, "test": 9}
    assert results["sizes"]["train"] == 12                              # the few-shot sample beside it


def test_a_phases_peak_memory_counts_what_its_inner_sections_reached():
    """Nested sections: the outer phase's peak is the largest resident memory between its start
    and its end, the inner ones' included (each inner start resets the kernel's mark)."""
    import numpy as np
    from utils import PhaseClock
    clock = PhaseClock()
    with clock.section("outer"):
        with clock.section("inner big"):
            big = np.ones(300 << 17)     # 300 MB, touched
            del big
        with clock.section("inner small"):
            pass
    peaks = {name: phase["peak_mb"] for name, phase in clock.phases.items()}
    assert peaks["inner big"] > peaks["inner small"] + 200
    assert peaks["outer"] >= peaks["inner big"]
