"""Checkpoints and results files read back: validated field by field, used only for their own run."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, args_for, build_dtd, cli, folder_copy, one_line_error, run_dir


# --------------------------------------------------------------------------- checkpoints of other datasets
@pytest.mark.slow
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


@pytest.mark.slow
def test_same_dataset_with_other_class_names_is_refused(dtd, tmp_path, capsys):
    assert cli(args_for(dtd, tmp_path), capsys)[0] == 0
    split = json.loads((dtd / "split_zhou_DescribableTextures.json").read_text())
    for rows in split.values():
        for row in rows:
            row[2] = row[2].replace("blue square", "navy square")
    (dtd / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    code, _, err = cli(args_for(dtd, tmp_path, "--eval-only"), capsys)
    one_line_error(code, err, "trained on other classes", "'blue square' there, 'navy square' here")


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):
    """One trained tiny run (dtd layout) the checkpoint and results tests damage copies of."""
    tmp = tmp_path_factory.mktemp("trained")
    root = build_dtd(demo_root, tmp / "dtd")
    from utils import run_main
    import main
    assert run_main(main.main, args_for(root, tmp, "--baselines", "[]")) == 0
    return root, tmp, run_dir(tmp)


@pytest.mark.parametrize("damage,fragment", [
    (lambda c: c | {"pool": 5}, "'pool' is 5"),
    (lambda c: c | {"format": "2"}, "format field is '2'"),
    (lambda c: c | {"text": c["text"][:, :2]}, "text matrix has 2 columns"),
    (lambda c: c | {"classnames": c["classnames"][:1]}, "1 class names for 3 classes"),
    (lambda c: c | {"config": c["config"] | {"lr": "fast"}}, "'lr' expects float"),
    (lambda c: c | {"text": c["text"] * float("nan")}, "a finite D × (classes + 1) text matrix"),
    # a pool of numbers that are not numbers: every image scored alike, zero-shot's accuracy reported as RAFT's
    (lambda c: c | {"pool": {k: v * float("nan") for k, v in c["pool"].items()}}, "NaN or infinite"),
    (lambda c: c | {"pool": {**c["pool"], "c_proj.bias": c["pool"]["c_proj.bias"] + float("inf")}},
     "'c_proj.bias' holds"),
    (lambda c: c | {"trunk_batchnorm": {k: v * float("nan") if v.is_floating_point() else v
                                        for k, v in c["trunk_batchnorm"].items()}}, "BatchNorm statistic"),
])
def test_checkpoints_with_the_usual_keys_but_wrong_values(trained, tmp_path, capsys, damage, fragment):
    root, tmp, folder = trained
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(damage(good), run / "checkpoint.pt")
    one_line_error(*cli(args_for(root, tmp, "--eval-only", "--checkpoint", str(run / "checkpoint.pt")),
                        capsys)[::2], fragment)
    image = next((root / "images" / "red_circle").glob("*.jpg"))
    one_line_error(*cli([str(run), str(image)], capsys, entry="scripts.predict")[::2], fragment)
    one_line_error(*cli([str(run), str(image), "--out", str(tmp_path / "v")], capsys, entry="scripts.visualize")[::2],
                   fragment)


@pytest.mark.parametrize("damage", ["{\"alpha\": ", "[]", "{\"alpha\": \"high\"}", "{\"alpha\": 7}"])
def test_a_damaged_results_file(trained, tmp_path, capsys, damage):
    root, tmp, folder = trained
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    (run / "results.json").write_text(damage)
    image = next((root / "images" / "red_circle").glob("*.jpg"))
    one_line_error(*cli([str(run), str(image)], capsys, entry="scripts.predict")[::2], "results file", "results.json")
    one_line_error(*cli([str(run), str(image), "--out", str(tmp_path / "v")], capsys, entry="scripts.visualize")[::2],
                   "results file")


def test_a_damaged_results_file_is_evaluated_again(trained, capsys):
    root, tmp, folder = trained
    before = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text("{\"alpha\": ")
    code, out, err = cli(args_for(root, tmp, "--baselines", "[]"), capsys)
    assert code == 0 and "evaluating the run again" in err and "training already finished" in out
    assert json.loads((folder / "results.json").read_text())["test_acc"] == before["test_acc"]


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


# --------------------------------------------------------------------------- files that declare more than they hold
@pytest.mark.parametrize("declared", [64 << 20, 512 << 20])
def test_a_small_file_declaring_gigabytes_is_refused_before_it_is_read(tmp_path, declared):
    import zipfile
    from utils import RaftError, torch_load
    path = tmp_path / "inflated.pt"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            if name.endswith("/data/0"):
                with archive.open(name, "w", force_zip64=True) as out:
                    zero = bytes(1 << 20)
                    for _ in range(declared >> 20):
                        out.write(zero)
            else:
                archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)
    assert path.stat().st_size < declared / 100
    for what in ("checkpoint", "weights file", "resume state"):
        with pytest.raises(RaftError, match=f"refusing to load {what} .*bytes declare .* in compressed entries"):
            torch_load(path, what)


def test_checkpoints_holding_numpy_scalars_load_and_other_globals_are_named(tmp_path):
    """MetaCLIP's released checkpoints hold numpy scalars (mlfoundations/open_clip#966): they load;
    anything else a pickle names is refused, saying what it names."""
    import collections
    import datetime
    import numpy as np
    from utils import RaftError, torch_load
    path = tmp_path / "metaclip.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": np.int64(32), "best": np.float64(0.5),
                "lr": np.float32(1e-4), "flag": np.bool_(True)}, path)
    loaded = torch_load(path, "weights file")
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and loaded["epoch"] == 32 and loaded["best"] == 0.5
    import zipfile   # as numpy 1 pickled it (MetaCLIP's files): numpy.core.multiarray.scalar
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(tmp_path / "numpy1.pt", "w") as archive:
        for name, data in entries:
            archive.writestr(name, data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch_load(tmp_path / "numpy1.pt", "weights file")["epoch"] == 32
    for payload, named in ((collections.OrderedDict(a=np.arange(3)), "numpy._core.multiarray._reconstruct"),
                           ({"when": datetime.date(2024, 1, 1)}, "datetime.date")):
        torch.save(payload, tmp_path / "other.pt")
        with pytest.raises(RaftError, match="needs pickled Python code to load") as info:
            torch_load(tmp_path / "other.pt", "weights file")
        assert named in str(info.value)
