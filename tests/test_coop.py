"""CoOp as a run (run/methods.py): its own folder, results, the training loop's resume and torchrun,
summarize's table beside RAFT, bad inputs refused in one line. (Exactness against the published
code: test_published_methods.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, args_for, cli, one_line_error, trained_nothing

COOP = ("--method", "coop", "--baselines", "[]")


def coop_dir(tmp_path, out="out"):
    return tmp_path / out / "dtd" / "tiny-rn_4shots_seed1_coop"


@pytest.mark.slow
def test_coop_trains_in_its_own_folder_and_sits_beside_raft_in_summarize(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path, "--baselines", "[zero_shot]"), capsys)[0] == 0
    code, out, err = cli(args_for(dtd, tmp_path, *COOP), capsys)
    assert code == 0, err
    r = json.loads((coop_dir(tmp_path) / "results.json").read_text())
    assert r["method"] == "coop" and r["config"]["method"] == "coop"
    assert len(r["history"]) == 100                       # the published epochs at 4 shots (rn50_ep100)
    assert r["history"][0]["lr"] == pytest.approx(1e-5) and r["history"][1]["lr"] == pytest.approx(0.002)
    assert "-> CoOp" in out and "alpha" not in r
    assert (coop_dir(tmp_path) / "history.csv").read_text().startswith("epoch,loss")
    raft = json.loads((tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1" / "results.json").read_text())
    assert r["zero_shot_acc"] == raft["zero_shot_acc"]     # the same images and text
    code, text, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0
    header = next(line for line in text.splitlines() if line.startswith("| dataset | shots | RAFT"))
    assert "CoOp" in header
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in text.splitlines() if line.startswith("| dtd | 4 |") and len(line.split("|")) == len(
        header.split("|")))
    cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["CoOp"] == f"{r['test_acc']:.2f}" and cells["RAFT"] == f"{raft['test_acc']:.2f}"
    # evaluating again reads the trained prompts
    code, _, err = cli(args_for(dtd, tmp_path, *COOP, "--eval-only"), capsys)
    assert code == 0, err
    again = json.loads((coop_dir(tmp_path) / "results_eval.json").read_text())
    assert again["test_acc"] == r["test_acc"]


@pytest.mark.slow
def test_coop_stopped_and_resumed_ends_where_an_uninterrupted_run_does(dtd, tmp_path):
    argv = [sys.executable, str(ROOT / "main.py"), *args_for(dtd, tmp_path, *COOP, "--save_every", "0")]
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    expected = json.loads((coop_dir(tmp_path) / "results.json").read_text())
    import shutil
    shutil.rmtree(tmp_path / "out")
    log = coop_dir(tmp_path) / "log.txt"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (not log.exists() or log.read_text().count("training state saved") < 20):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (coop_dir(tmp_path) / "results.json").exists()
    final = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    got = json.loads((coop_dir(tmp_path) / "results.json").read_text())
    assert "resuming from" in log.read_text()
    assert (got["test_acc"], got["val_acc"]) == (expected["test_acc"], expected["val_acc"])
    assert [row["loss"] for row in got["history"]] == [row["loss"] for row in expected["history"]]


@pytest.mark.slow
def test_coop_under_torchrun_ends_with_the_numbers_of_one_process(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path, *COOP), capsys)[0] == 0
    one = json.loads((coop_dir(tmp_path) / "results.json").read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"),
           *args_for(dtd, tmp_path, *COOP, "--output_dir", str(tmp_path / "two"), "--cache_dir", str(tmp_path / "c2"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((coop_dir(tmp_path, "two") / "results.json").read_text())
    # the same global batches, crops and order; the gradients summed over the two shares: the
    # losses agree to float32 rounding, the accuracies to at most one image of 9 (a tie may flip)
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * max(1.0, abs(a["loss"]))
    assert abs(one["test_acc"] - two["test_acc"]) <= 100 / 9 + 1e-6 and two["world_size"] == 2


@pytest.mark.parametrize("extra, fragments", [
    (("--coop_n_ctx", "8"), ("coop_n_ctx (--coop_n_ctx) is an option of method coop", "--method coop")),
    (("--method", "coop", "--coop_n_ctx", "0"), ("coop_n_ctx", ">= 1")),
    (("--method", "cop"), ("method", "did you mean 'coop'")),
    (("--method", "coop", "--protocol", "base2new"), ("method coop", "few-shot protocol")),
    (("--method", "coop", "--coop_position", "back"), ("coop_position", "'end', 'middle' or 'front'")),
])
def test_bad_method_settings_are_refused_in_one_line_before_anything_is_written(dtd, tmp_path, capsys, extra,
                                                                                 fragments):
    code, _, err = cli(args_for(dtd, tmp_path, *extra), capsys)
    one_line_error(code, err, *fragments)
    assert trained_nothing(tmp_path)


def test_a_class_name_past_the_text_window_is_refused_naming_it(tiny_clip):
    from clip.prompts import PromptLearner
    from utils import RaftError
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    with pytest.raises(RaftError, match=r"CoOp's prompt for class 'a .*' does not fit the text encoder's window of 77 "
                                        r"tokens with 64 context tokens"):
        PromptLearner(model, tokenizer, ["dog", "a " + "very " * 20 + "long name"], n_ctx=64)
    prompts = PromptLearner(model, tokenizer, ["dog", "red circle"], n_ctx=16)   # fits
    assert prompts().shape == (2, 77, model.ln_final.weight.shape[0])


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_every_class_token_position_puts_the_name_where_it_says(tiny_clip, position):
    from clip.prompts import PromptLearner
    torch.manual_seed(0)
    prompts = PromptLearner(tiny_clip.model, tiny_clip.tokenizer, ["red circle", "dog"], n_ctx=4, position=position)
    embedded = prompts()
    name = tiny_clip.model.token_embedding(prompts.tokens)[0, 1 + 4:1 + 4 + 2]   # 'red circle' after the X's
    start = {"end": 1 + 4, "middle": 1 + 2, "front": 1}[position]
    assert torch.equal(embedded[0, start:start + 2], name)
    ctx_at = {"end": 1, "middle": 1, "front": 1 + 2}[position]
    assert torch.equal(embedded[0, ctx_at], prompts.ctx[0])
