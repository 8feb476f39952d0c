"""The generalisation protocols (doc/protocols.md): base-to-new, cross-dataset transfer, domain
generalisation — on throw-away trees built from the real split files, with the tiny CLIP."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, cli, one_line_error, shared_fixture
from datasets import read_coop_dataset
from utils import harmonic_mean

FAST = ["--backbone", "tiny-rn", "--weights", "null", "--calibrate_bn", "true", "--descriptions", "null",
        "--train_epoch", "2", "--warmup_epoch", "1", "--batch_size", "32", "--num_workers", "0", "--lr", "3e-3",
        "--shots", "2", "--name", ""]


def small_tree(root, dataset, split_file, per_class=(2, 1, 2), seed=0):
    """The real split file cut to a few images per class (same classes, labels and names),
    with small generated images: the reader, the class split and the protocols are the real ones."""
    rows = json.loads(shared_fixture("coop_splits", split_file).read_text())
    rng = np.random.default_rng(seed)
    image_dir = {"oxford_pets": "images", "dtd": "images"}[dataset]
    cut = {}
    for split, n in zip(("train", "val", "test"), per_class):
        seen, kept = {}, []
        for path, label, name in rows[split]:
            if seen.get(label, 0) < n:
                seen[label] = seen.get(label, 0) + 1
                kept.append([path, label, name])
                target = root / image_dir / path
                target.parent.mkdir(parents=True, exist_ok=True)
                colour = np.array([(label * 53) % 255, (label * 97) % 255, (label * 29) % 255], dtype=np.float32)
                pixels = np.clip(colour + rng.normal(0, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(target, quality=85)
        cut[split] = kept
    (root / split_file).write_text(json.dumps(cut))
    return root


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return small_tree(tmp_path_factory.mktemp("pets"), "oxford_pets", "split_zhou_OxfordPets.json")


@pytest.fixture(scope="module")
def dtd47(tmp_path_factory):
    return small_tree(tmp_path_factory.mktemp("dtd47"), "dtd", "split_zhou_DescribableTextures.json")


def args(dataset, root, tmp_path, *extra):
    return ["--config", str(ROOT / "configs" / f"{dataset}.yaml"), "--data_path", str(root),
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), *FAST, *extra]


@pytest.mark.parametrize("dataset,fixture,base,new", [("oxford_pets", "pets", 19, 18), ("dtd", "dtd47", 24, 23)])
def test_class_split_relabelling_and_test_partition(dataset, fixture, base, new, request):
    from clip.published import numerics_of
    from run.config import build_config
    from run.context import RunContext, RunFolder
    from run.task import make_task
    from utils import PhaseClock
    data = read_coop_dataset(dataset, request.getfixturevalue(fixture))
    cfg = build_config(None, {"dataset": dataset, "data_path": "x", "protocol": "base2new"})
    folder = RunFolder(__import__("logging").getLogger("t"), *[None] * 3)
    task = make_task(RunContext(cfg, data, folder, torch.device("cpu"), False, numerics_of("float32"), PhaseClock()))
    b, n = task.targets["base"], task.targets["new"]
    assert (b.num_classes, n.num_classes) == (base, new) and task.train is b
    assert b.classnames == data.classnames[:base] and n.classnames == data.classnames[base:]
    assert sorted({d.label for d in n.test}) == list(range(new))              # relabelled from 0
    assert all(n.classnames[d.label] == d.classname for d in n.test)
    assert {d.path for d in b.test}.isdisjoint({d.path for d in n.test})
    assert sorted(d.path for d in b.test + n.test) == sorted(d.path for d in data.test)   # a partition


@pytest.mark.slow
def test_base_to_new_run(pets, tmp_path, capsys):
    code, out, err = cli(args("oxford_pets", pets, tmp_path, "--protocol", "base2new"), capsys)
    assert code == 0, err
    run = tmp_path / "out" / "oxford_pets" / "tiny-rn_2shots_seed1_base2new"
    r = json.loads((run / "results.json").read_text())
    parts = r["base2new"]
    assert r["protocol"] == "base2new"
    assert (parts["base"]["num_classes"], parts["new"]["num_classes"]) == (19, 18)
    assert (parts["base"]["size"], parts["new"]["size"]) == (38, 36) and r["sizes"]["test"] == 74
    assert r["test_acc"] == pytest.approx(harmonic_mean(parts["base"]["test_acc"], parts["new"]["test_acc"]))
    assert parts["hm"] == r["test_acc"] and r["alpha_source"] == "val"
    assert r["sizes"]["val"] == 19                                           # base classes' val images only
    trained = json.loads((run / "fewshot.json").read_text())["items"]
    assert len(trained) == 38 and {row[1] for row in trained} == set(range(19))
    assert "base 2" not in out and "HM" in out


@pytest.mark.slow
def test_transfer_uses_the_targets_classes_and_the_sources_alpha(pets, dtd47, tmp_path, capsys):
    assert cli(args("oxford_pets", pets, tmp_path), capsys)[0] == 0
    source = tmp_path / "out" / "oxford_pets" / "tiny-rn_2shots_seed1"
    ckpt = str(source / "checkpoint.pt")
    common = ["--config", str(ROOT / "configs/dtd.yaml"), "--data_path", str(dtd47), "--cache_dir",
              str(tmp_path / "cache"), "--num_workers", "0", "--descriptions", "null"]
    code, out, err = cli([*common, "--eval-only", "--checkpoint", ckpt], capsys)
    assert code == 0, err
    t = json.loads((source / "transfer_dtd.json").read_text())
    s = json.loads((source / "results.json").read_text())
    assert t["protocol"] == "cross_dataset" and t["source"]["dataset"] == "oxford_pets"
    assert t["num_classes"] == 47 and t["sizes"]["test"] == 94 and t["alpha"] == s["alpha"]
    assert t["alpha_source"].startswith("the source run, ")
    assert (source / "log_transfer_dtd.txt").is_file()                       # the transfer logs apart
    assert "cross-dataset transfer" not in (source / "log.txt").read_text()
    # bad inputs: another backbone, a checkpoint that does not say where it was trained
    code, _, err = cli([*common, "--eval-only", "--checkpoint", ckpt, "--backbone", "tiny-vit"], capsys)
    one_line_error(code, err, "trained with backbone tiny-rn, this run uses tiny-vit")
    import torch
    old = torch.load(ckpt, weights_only=True)
    del old["dataset"]
    old["config"]["dataset"] = "folder"
    torch.save(old, tmp_path / "old.pt")
    code, _, err = cli([*common, "--eval-only", "--checkpoint", str(tmp_path / "old.pt")], capsys)
    one_line_error(code, err, "records no dataset it was trained on")
    assert not (tmp_path / "transfer_dtd.json").exists()


@pytest.mark.slow
def test_test_labels_choose_nothing(pets, tmp_path, capsys):
    """Permuting the test labels moves test accuracies, never alpha (nor anything else chosen)."""
    assert cli(args("oxford_pets", pets, tmp_path, "--protocol", "base2new"), capsys)[0] == 0
    run = tmp_path / "out" / "oxford_pets" / "tiny-rn_2shots_seed1_base2new"
    before = json.loads((run / "results.json").read_text())
    split_path = pets / "split_zhou_OxfordPets.json"
    original = split_path.read_text()
    try:
        split = json.loads(original)
        names = {label: name for _, label, name in split["train"]}
        shuffled = [row[1] for row in split["test"]]
        random.Random(0).shuffle(shuffled)
        split["test"] = [[path, label, names[label]] for (path, _, _), label in zip(split["test"], shuffled)]
        split_path.write_text(json.dumps(split))
        code, _, err = cli(args("oxford_pets", pets, tmp_path, "--protocol", "base2new", "--eval-only"), capsys)
        assert code == 0, err
    finally:
        split_path.write_text(original)
    after = json.loads((run / "results_eval.json").read_text())
    assert (after["alpha"], after["val_acc"]) == (before["alpha"], before["val_acc"])
    assert after["alpha_curve"]["val"] == before["alpha_curve"]["val"]
    assert after["alpha_curve"]["base"] != before["alpha_curve"]["base"]      # the test side did move


def test_base_to_new_needs_two_classes(tmp_path, capsys, demo_root):
    import shutil
    one = tmp_path / "one_class"
    shutil.copytree(demo_root / "images" / "red_circle", one / "red_circle")
    code, _, err = cli(["--config", str(ROOT / "configs/folder.yaml"), "--data_path", str(one), "--protocol",
                        "base2new", *FAST, "--output_dir", str(tmp_path / "out"), "--cache_dir",
                        str(tmp_path / "cache")], capsys)
    one_line_error(code, err, "protocol base2new needs at least 2 classes", "has 1")
    code, _, err = cli(["--config", str(ROOT / "configs/dtd.yaml"), "--protocol", "base2nwe"], capsys)
    one_line_error(code, err, "'protocol' must be 'fewshot' or 'base2new'", "did you mean 'base2new'")


@pytest.mark.slow
def test_domain_generalisation_script_scores_each_variant_on_its_classes(tmp_path, capsys):
    from test_end_to_end import build_imagenet
    from datasets.demo import DEMO_CLASSES, draw_image
    data = tmp_path / "imagenet"
    data.mkdir()
    wnids = build_imagenet(data, classes=4, train=6, val=2)
    rng = random.Random(1)

    def variant(folder, classes):
        for name, i in classes:
            (folder / name).mkdir(parents=True)
            for k in range(2):
                draw_image(DEMO_CLASSES[i][2], DEMO_CLASSES[i][1], 64, rng).save(folder / name / f"{k}.jpg")

    variant(tmp_path / "v2" / "imagenetv2-matched-frequency-format-val", [(str(i), i) for i in range(4)])
    variant(tmp_path / "sketch" / "sketch", [(wnids[i], i) for i in range(3)])        # a class folder missing
    variant(tmp_path / "a" / "imagenet-a", [(wnids[i], i) for i in (0, 2)])           # subsets, as A's 200
    variant(tmp_path / "r" / "imagenet-r", [(wnids[i], i) for i in (1, 2, 3)])
    argv = ["--config", str(ROOT / "configs/imagenet.yaml"), "--data_path", str(data), "--output_dir",
            str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--val_per_class", "2", "--num_classes", "4",
            *FAST]
    assert cli(argv, capsys, entry="main_imagenet")[0] == 0
    ckpt = tmp_path / "out" / "imagenet" / "tiny-rn_2shots_seed1" / "checkpoint.pt"
    env = dict(os.environ, V2=str(tmp_path / "v2"), SKETCH=str(tmp_path / "sketch"), A=str(tmp_path / "a"),
               R=str(tmp_path / "r"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts/domain_generalization.sh"), str(ckpt), "--data_path",
                           str(data), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shift = json.loads((ckpt.parent / "results_shift.json").read_text())["shift"]
    assert {k: (v["num_classes"], v["size"]) for k, v in shift.items()} == {
        "imagenet_v2": (4, 8), "imagenet_sketch": (4, 6), "imagenet_a": (2, 4), "imagenet_r": (3, 6)}
    # test_imagenet.sh's plain evaluation afterwards writes its own file: the shift results stay
    proc = subprocess.run(["bash", str(ROOT / "scripts/test_imagenet.sh"), str(ckpt), "--data_path", str(data),
                           "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shift" not in json.loads((ckpt.parent / "results_eval.json").read_text())
    assert json.loads((ckpt.parent / "results_shift.json").read_text())["shift"] == shift
    code, out, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0 and "domain generalisation" in out
    assert "| shots | imagenet | imagenet_v2 | imagenet_sketch | imagenet_a | imagenet_r | variants average |" in out


def test_summary_tables_of_the_protocols(tmp_path, capsys):
    root = tmp_path / "runs"

    def write(folder, name, payload):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(json.dumps(payload))

    for seed, (b, n) in zip((1, 2), ((80.0, 60.0), (82.0, 62.0))):
        write(f"dtd/RN50_16shots_seed{seed}_base2new", "results.json", {
            "dataset": "dtd", "backbone": "RN50", "shots": 16, "seed": seed, "protocol": "base2new",
            "test_acc": harmonic_mean(b, n), "zero_shot_acc": 50.0,
            "base2new": {"base": {"test_acc": b, "zero_shot_acc": 55.0}, "new": {"test_acc": n, "zero_shot_acc": 45.0}}})
        folder = f"imagenet/RN50_16shots_seed{seed}"
        write(folder, "results.json", {"dataset": "imagenet", "backbone": "RN50", "shots": 16, "seed": seed,
                                       "test_acc": 60.0 + seed, "zero_shot_acc": 55.0})
        for target, acc in (("dtd", 40.0 + seed), ("eurosat", 30.0 + seed)):
            write(folder, f"transfer_{target}.json", {"dataset": target, "backbone": "RN50", "shots": 16,
                                                       "seed": seed, "test_acc": acc, "zero_shot_acc": 20.0})
    code, out, err = cli([str(root), "--out", str(tmp_path / "sum"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0, err
    b2n = (tmp_path / "sum" / "summary_RN50_base2new.md").read_text()
    assert "| dtd | 16 | 81.00 ± 1.00 | 61.00 ± 1.00 |" in b2n and "11-dataset average appears once all 11" in b2n
    rows = (tmp_path / "sum" / "summary_RN50_base2new.csv").read_text().splitlines()   # the group's own table
    assert rows[0].startswith("group,dataset,shots,runs,base,new,hm")
    transfer = (tmp_path / "sum" / "summary_RN50.md").read_text()
    assert "| source | shots | source test | dtd | eurosat | target average |" in transfer
    assert "| imagenet | 16 | 61.50 ± 0.50 | 41.50 ± 0.50 | 31.50 ± 0.50 | 36.50 ± 0.50 |" in transfer
    assert "RN50,imagenet,16,target_average,2,36.5000" in (tmp_path / "sum" / "summary_RN50_transfer.csv").read_text()


# --------------------------------------------------------------------------- what the choices are made on
@pytest.mark.slow
def test_the_three_validation_rules_are_recorded_and_kept_apart(dtd, tmp_path, capsys):
    from conftest import args_for, cli, one_line_error
    base = args_for(dtd, tmp_path, "--shots", "1", "--baselines", "[linear_probe, tip_adapter]")
    assert cli(base, capsys)[0] == 0
    assert cli([*base, "--val_source", "fewshot"], capsys)[0] == 0
    code, _, err = cli([*base, "--val_source", "none"], capsys)
    one_line_error(code, err, "val_source: none", "--alpha")
    assert cli([*base, "--val_source", "none", "--alpha", "0.5"], capsys)[0] == 0
    out = tmp_path / "out" / "dtd"
    split, fewshot, none = (json.loads((out / f"tiny-rn_1shots_seed1{s}" / "results.json").read_text())
                            for s in ("", "_val-fewshot", "_val-none"))
    assert (split["validation"]["source"], split["sizes"]["val"]) == ("split", 6)
    assert (fewshot["validation"]["source"], fewshot["validation"]["per_class"], fewshot["sizes"]["val"]) == \
        ("fewshot", 1, 3)                                          # min(shots, 4) = 1 per class
    listed = json.loads((out / "tiny-rn_1shots_seed1_val-fewshot" / "val_fewshot.json").read_text())
    assert len(listed["items"]) == 3
    assert none["sizes"]["val"] == 0 and none["alpha_source"] == "config"
    assert none["baselines"]["linear_probe"]["hyper"]["C_source"].startswith("fixed")
    assert none["baselines"]["tip_adapter"]["hyper"] == {"a": 2.0, "b": 1.0, "ab_source": "fixed: no validation "
                                                         "data (the published initial a, b)"}   # DTD's row
    code, text, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0 and "tiny-rn_val-fewshot" in text and "tiny-rn_val-none" in text   # never averaged together


def test_a_few_shot_validation_draw_is_reproducible(dtd):
    from clip.published import numerics_of
    from run.config import build_config
    from run.context import RunContext, RunFolder
    from run.task import make_task, sample_images
    from utils import PhaseClock
    import dataclasses
    data = read_coop_dataset("dtd", dtd)
    draws = []
    for seed in (1, 1, 2, 3, 4, 5):
        cfg = build_config(None, {"dataset": "dtd", "data_path": str(dtd), "shots": 1, "seed": seed,
                                  "val_source": "fewshot"})
        ctx = RunContext(cfg, data, RunFolder(__import__("logging").getLogger("t"), *[None] * 3),
                         torch.device("cpu"), False, numerics_of("float32"), PhaseClock())
        ctx = dataclasses.replace(ctx, task=make_task(ctx))
        draws.append([d.path for d in sample_images(ctx).val])
    assert draws[0] == draws[1] and len(draws[0]) == 3
    assert len({tuple(sorted(d)) for d in draws}) > 1          # the seed draws them (2 val images per class here)


@pytest.mark.slow
def test_alpha_on_test_is_the_oracle_marked_everywhere_and_refused_where_it_would_leak(dtd, tmp_path, capsys):
    from conftest import args_for, cli, one_line_error
    base = args_for(dtd, tmp_path, "--baselines", "[]")
    assert cli([*base, "--alpha_on", "test"], capsys)[0] == 0
    run = tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1_alpha-on-test"
    r = json.loads((run / "results.json").read_text())
    assert r["alpha_source"] == "test" and r["alpha"] == r["oracle"]["alpha"] and r["validation"]["alpha_on"] == "test"
    code, text, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0 and "‡" in text and "an oracle" in text
    for extra, fragment in ((["--protocol", "base2new"], "base2new"), (["--shift_sets", "{imagenet_v2: x}"],
                                                                        "shift_sets")):
        code, _, err = cli([*base, "--alpha_on", "test", *extra], capsys)
        one_line_error(code, err, "alpha_on: test", fragment)
    other = [a if a != str(ROOT / "configs/dtd.yaml") else str(ROOT / "configs/folder.yaml") for a in base]
    birds = tmp_path / "birds"
    for name in ("red_circle", "blue_square", "green_triangle"):
        __import__("shutil").copytree(dtd / "images" / name, birds / name)
    other[other.index("--data_path") + 1] = str(birds)
    code, _, err = cli([*other, "--eval-only", "--checkpoint", str(run / "checkpoint.pt")], capsys)
    one_line_error(code, err, "alpha_on: test", "transfer")
