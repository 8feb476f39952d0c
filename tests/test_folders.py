"""Run folders: named by their settings, never answering for another run's settings or data."""
import pytest
import json
import shutil

from conftest import ROOT, SPLIT, args_for, cli, folder_copy, one_line_error, poison_loss_at, run_dir


# --------------------------------------------------------------------------- experiments do not collide
@pytest.mark.slow
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
    code, text, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0 and "RAFT, tiny-rn_lr=0.0002_lambda2=1: 1 run\n" in text and "tiny-rn_warmer" in text


@pytest.mark.slow
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


# --------------------------------------------------------------------------- folders and validation draws
def test_data_path_dot_is_named_after_the_folder_and_output_stays_out(dtd, tmp_path, capsys, monkeypatch):
    data = folder_copy(dtd, tmp_path / "my_shapes")
    monkeypatch.chdir(data)
    code, _, err = cli(["--config", str(ROOT / "configs/folder.yaml"), "--data_path", "."], capsys)
    one_line_error(code, err, "is inside the dataset folder", "run from another folder")
    assert sorted(p.name for p in data.iterdir()) == ["blue_square", "green_triangle", "red_circle"]
    from datasets import read_folder_dataset
    assert read_folder_dataset(".", [0.5, 0.2, 0.3], 1, tmp_path / "cache").name == "my_shapes"


# --------------------------------------------------------------------------- 11. another experiment's numbers
def test_a_finished_folder_never_answers_for_other_settings_or_data(dtd, tmp_path, capsys):
    flags = ["--data_path", str(dtd), "--num_classes", "3", "--backbone", "tiny-rn", "--weights", "null",
             "--calibrate_bn", "true", "--descriptions", "null", "--output_dir", str(tmp_path / "out"),
             "--cache_dir", str(tmp_path / "cache"), "--train_epoch", "2", "--warmup_epoch", "1",
             "--batch_size", "8", "--num_workers", "0", "--shots", "2", "--baselines", "[]"]
    base = (ROOT / "configs/dtd.yaml").read_text()
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(base.replace("lr: 1.0e-4", "lr: 3.0e-3"))
    second.write_text(base.replace("lr: 1.0e-4", "lr: 2.0e-3") + "templates: ['a {} texture.']\n")
    assert cli(["--config", str(first), *flags], capsys)[0] == 0
    code, _, err = cli(["--config", str(second), *flags], capsys)
    one_line_error(code, err, "holds a finished run with other settings", "lr: 0.003 -> 0.002",
                   "templates: None -> ['a {} texture.']", "--name")
    other = tmp_path / "dtd_copy"
    shutil.copytree(dtd, other)
    split = json.loads((other / SPLIT).read_text())
    split["test"].append(split["train"].pop())          # another split of the same images
    (other / SPLIT).write_text(json.dumps(split))
    code, _, err = cli(["--config", str(first), *flags, "--data_path", str(other)], capsys)
    one_line_error(code, err, "was made on other data than dtd", str(other))
    assert "few-shot sample" not in err


def test_a_resumable_run_on_other_data_says_the_data_changed(dtd, tmp_path, capsys, monkeypatch):
    poison_loss_at(monkeypatch, 4)
    argv = args_for(dtd, tmp_path, "--save_every", "0", "--baselines", "[]")
    assert cli(argv, capsys)[0] == 2 and (run_dir(tmp_path) / "resume.pt").is_file()
    monkeypatch.undo()
    split = json.loads((dtd / SPLIT).read_text())
    split["train"][0], split["val"][0] = split["val"][0], split["train"][0]
    (dtd / SPLIT).write_text(json.dumps(split))
    code, _, err = cli(argv, capsys)
    one_line_error(code, err, "was made on other data", "training images differ")
    assert "sampler" not in err


# --------------------------------------------------------------------------- names that would leave the output root
@pytest.mark.parametrize("name,fragment", [("../x", "path separator"), ("a/b", "path separator"),
                                           ("..", "'.' or '..'"), (".", "'.' or '..'"),
                                           ("x" * 300, "longer than the 255 bytes"), ("a\x00b", "NUL")])
def test_a_run_name_stays_inside_the_output_root(dtd, tmp_path, capsys, name, fragment):
    args = args_for(dtd, tmp_path)
    args[args.index("--name") + 1] = name
    code, _, err = cli(args, capsys)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()   # nothing written, anywhere


def test_a_name_from_a_config_file_is_checked_too(dtd, tmp_path, capsys):
    config = tmp_path / "named.yaml"
    config.write_text(f"dataset: dtd\ndata_path: {dtd}\nname: ../../escaped\n")
    args = [a for a in args_for(dtd, tmp_path) if a not in ("--name", "")]
    code, _, err = cli(["--config", str(config), *args[2:]], capsys)
    one_line_error(code, err, "path separator")
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


# --------------------------------------------------------------------------- one run per folder at a time
def test_a_folder_belongs_to_one_run_at_a_time(dtd, tmp_path, capsys):
    import subprocess
    import sys
    import time
    folder = run_dir(tmp_path)
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, time; f = open({str(folder / '.lock')!r}, 'a'); "
                               f"fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = cli(args_for(dtd, tmp_path), capsys)
        one_line_error(code, err, "another run", "is using", str(folder))
        assert not (folder / "log.txt").exists() and not (folder / "config.yaml").exists()
        code, _, err = cli([*args_for(dtd, tmp_path), "--baselines", "[zero_shot]"], capsys,
                           entry="scripts.run_baselines")
        one_line_error(code, err, "another run", "is using")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0         # the lock dies with its process
    assert cli(args_for(dtd, tmp_path, "--force"), capsys)[0] == 0   # and is released when a run ends
