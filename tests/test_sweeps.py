"""A week of experiments without surprises: the scripts (help, Ctrl-C, progress, finished runs
left out without starting Python), results files by purpose (doc/robustness.md, README)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, args_for, run_dir

SCRIPTS = ["sweep.sh", "train_other_datasets.sh", "base2new.sh", "train_imagenet.sh", "cross_dataset.sh",
           "domain_generalization.sh", "test_imagenet.sh", "slurm_array.sh"]



def counting_python(tmp_path):
    """A `python` that writes each command line it is given to calls.txt, then runs it."""
    calls, counting = tmp_path / "calls.txt", tmp_path / "python"
    counting.write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {calls}\nexec {sys.executable} \"$@\"\n")
    counting.chmod(0o755)
    return calls, counting

@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_script_prints_its_usage_and_runs_nothing(script, flag, tmp_path):
    marker = tmp_path / "ran"
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\ntouch {marker}\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script), flag], env=dict(os.environ, PYTHON=str(fake)),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() and "bash scripts/" in proc.stdout, proc.stderr
    assert not marker.exists()


def sweep(tmp_path, dtd, seeds, *extra, **kwargs):
    """The real sweep script on the tiny dtd fixture (its settings passed as overrides)."""
    overrides = args_for(dtd, tmp_path, *extra)[2:]          # everything but --config
    return subprocess.Popen(["bash", str(ROOT / "scripts/sweep.sh"), "dtd", "4", seeds, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHON=sys.executable), **kwargs)


@pytest.mark.slow
def test_one_ctrl_c_stops_the_whole_sweep_with_its_summary(dtd, tmp_path):
    proc = sweep(tmp_path, dtd, "1 2 3", "--train_epoch", "40", "--save_every", "0", "--baselines", "[]",
                 start_new_session=True)
    log = run_dir(tmp_path) / "log.txt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or "training state saved" not in log.read_text()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)                        # the terminal's Ctrl-C: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "0 done, 1 failed, 2 not started (stopped by a signal)" in err
    assert "[1/3]" in out and "[2/3]" not in out              # nothing started after the Ctrl-C
    assert (run_dir(tmp_path) / "resume.pt").is_file()        # the run in progress saved its state


@pytest.mark.slow
def test_finished_runs_are_left_out_without_starting_python_and_progress_is_shown(dtd, tmp_path):
    proc = sweep(tmp_path, dtd, "1 2", "--train_epoch", "2", "--baselines", "[]")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "[1/2]" in out and "[2/2]" in out and "about" in out and "2 done, 0 failed, 0 not started" in err
    calls, counting = counting_python(tmp_path)
    overrides = args_for(dtd, tmp_path, "--train_epoch", "2", "--baselines", "[]")[2:]
    again = subprocess.run(["bash", str(ROOT / "scripts/sweep.sh"), "dtd", "4", "1 2", *overrides],
                           env=dict(os.environ, PYTHON=str(counting)), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 of 2 runs already finished" in again.stderr
    assert "0 done, 0 failed, 0 not started, 2 already finished (left out)" in again.stderr   # the final count too
    assert [line.split()[0].rsplit("/", 1)[-1] for line in calls.read_text().splitlines()] == ["pending.py"]


@pytest.mark.slow
def test_test_imagenet_honours_data(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    subprocess.run(["bash", str(ROOT / "scripts/test_imagenet.sh"), "ck.pt"], env=dict(os.environ, PYTHON=str(fake),
                   DATA="/data/root"), check=True, timeout=30)
    assert "--data_path /data/root/imagenet" in calls.read_text()


@pytest.mark.parametrize("tool", ["scripts/predict.py", "scripts/visualize.py", "scripts/summarize.py",
                                  "gpt3_file/generate.py", "bench/bench_speed.py", "scripts/run_baselines.py",
                                  "scripts/get_files.py",
                                  "scripts/check_data.py", "scripts/import_published.py"])
def test_every_tool_shows_its_defaults_and_its_own_text(tool, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"tool_{tool.replace('/', '_')[:-3]}", ROOT / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and "(default:" in text.replace("\n", " ")
    if tool == "scripts/run_baselines.py":
        assert "usage: scripts/run_baselines.py" in text and "--eval-only" not in text and "Run only" in text


# --------------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_sweep_runs_past_failures_lists_them_and_honours_python_and_data(tmp_path):
    fake = tmp_path / "fakepy"
    log = tmp_path / "calls.txt"
    fake.write_text(f"#!/usr/bin/env bash\nif [[ \"$1\" == *pending.py ]]; then exec {sys.executable} \"$@\"; fi\n"
                    f"echo \"$@\" >> {log}\n[[ \"$*\" == *\"--seed 1\"* ]] && exit 2\nexit 0\n")
    fake.chmod(0o755)
    for dataset in ("dtd", "eurosat"):    # their folders (the sweep checks they exist; the fake runs read nothing)
        (tmp_path / "data" / dataset).mkdir(parents=True)
    env = dict(os.environ, PYTHON=str(fake), DATA=str(tmp_path / "data"))
    proc = subprocess.run(["bash", str(ROOT / "scripts/sweep.sh"), "dtd eurosat", "4", "1 2", "--lr", "2e-4"],
                          env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert len(calls) == 4                                               # every run was tried
    assert all(f"--data_path {tmp_path}/data/dtd" in c for c in calls[:2]) and f"{tmp_path}/data/eurosat" in calls[2]
    assert all(c.endswith("--lr 2e-4") for c in calls)
    assert proc.returncode == 1
    assert "2 runs failed" in proc.stderr and "--config configs/dtd.yaml --shots 4 --seed 1" in proc.stderr


@pytest.mark.slow
def test_a_sweep_without_data_says_so_once_for_every_dataset_and_runs_nothing(tmp_path):
    calls, counting = counting_python(tmp_path)
    (tmp_path / "data" / "dtd").mkdir(parents=True)          # one of three is there
    for script in ("sweep.sh", "train_other_datasets.sh"):
        calls.write_text("")
        done = subprocess.run(["bash", str(ROOT / "scripts" / script), "dtd eurosat ucf101", "4", "1"],
                              env=dict(os.environ, PYTHON=str(counting), DATA=str(tmp_path / "data")),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "no data for 2 of 3 dataset(s): eurosat" in done.stderr, done.stderr
        assert "ucf101" in done.stderr and "scripts/get_files.py" in done.stderr and "check_data.py" in done.stderr
        assert len(calls.read_text().splitlines()) == 1      # one Python start: the check, no run


def test_the_slurm_scripts_help_shows_its_sbatch_lines():
    done = subprocess.run(["bash", str(ROOT / "scripts/slurm_array.sh"), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and "#SBATCH --gres=gpu:1" in done.stdout and "\nSBATCH" not in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("given", ["link", "birds_v2"])
def test_a_folder_dataset_behind_a_symlink_is_one_run_for_main_and_pending(dtd, tmp_path, capsys, given):
    """One rule names a folder dataset's runs (the path as given; resolved only for . and ..):
    a run finished through a symlink is not listed as pending again."""
    from conftest import cli, folder_copy
    target = folder_copy(dtd, tmp_path / "birds_v2")
    (tmp_path / "link").symlink_to(target)
    data = str(tmp_path / given)
    common = ["--data_path", data, "--backbone", "tiny-rn", "--weights", "null", "--calibrate_bn", "true",
              "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--train_epoch", "2",
              "--warmup_epoch", "1", "--batch_size", "8", "--num_workers", "0", "--baselines", "[]", "--name", ""]
    assert cli(["--config", str(ROOT / "configs/folder.yaml"), "--shots", "2", *common], capsys)[0] == 0
    listed = subprocess.run([sys.executable, str(ROOT / "scripts/pending.py"), "folder", "2", "1", *common],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert listed.returncode == 0 and listed.stdout.strip() == "", (listed.stdout, listed.stderr)
    assert "1 of 1 run already finished" in listed.stderr
