"""Readers against the real CoOp split files (throw-away image trees), ImageNet, few-shot sampling."""
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, SPLIT, args_for, cli, one_line_error, run_dir, shared_fixture, trained_nothing
from datasets import LAYOUTS, few_shot, read_coop_dataset, read_imagenet, read_shift_set, validation_from_train
from datasets.base import Datum
from utils import RaftError

# split file -> (config name, classes, train, val, test) as in DATASETS.md
REAL_SPLITS = {
    "split_zhou_Caltech101.json": ("caltech101", 100, 4128, 1649, 2465),
    "split_zhou_OxfordPets.json": ("oxford_pets", 37, 2944, 736, 3669),
    "split_zhou_StanfordCars.json": ("stanford_cars", 196, 6509, 1635, 8041),
    "split_zhou_OxfordFlowers.json": ("oxford_flowers", 102, 4093, 1633, 2463),
    "split_zhou_DescribableTextures.json": ("dtd", 47, 2820, 1128, 1692),
    "split_zhou_EuroSAT.json": ("eurosat", 10, 13500, 5400, 8100),
    "split_zhou_UCF101.json": ("ucf101", 101, 7639, 1898, 3783),
}


def touch_tree(root: Path, image_dir: str, rel_paths) -> None:
    for rel in rel_paths:
        p = root / image_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


@pytest.mark.slow
@pytest.mark.parametrize("split_file", sorted(REAL_SPLITS))
def test_json_reader_on_real_split_files(split_file, tmp_path):
    src = shared_fixture("coop_splits", split_file)
    name, classes, n_train, n_val, n_test = REAL_SPLITS[split_file]
    layout = LAYOUTS[name]
    assert layout.split_file == split_file
    shutil.copy(src, tmp_path / split_file)
    rows = json.loads(src.read_text())
    touch_tree(tmp_path, layout.image_dir, {r[0] for s in rows.values() for r in s})
    data = read_coop_dataset(name, tmp_path)
    assert (data.num_classes, len(data.train), len(data.val), len(data.test)) == (classes, n_train, n_val, n_test)
    assert all(Path(d.path).is_file() for d in data.train[:50] + data.test[-50:])
    first = rows["train"][0]
    assert data.train[0] == Datum(str(tmp_path / layout.image_dir / first[0]), first[1], first[2])
    assert data.classnames[first[1]] == first[2]
    shots = few_shot(data.train, 4, seed=1, num_classes=classes)
    assert len(shots) == 4 * classes and all(Path(d.path).is_file() for d in shots)


@pytest.mark.slow
def test_fgvc_text_files(tmp_path):
    src = shared_fixture("coop_splits", "images_variant_train.txt")
    lines = src.read_text().splitlines()
    variants = sorted({line.split(" ", 1)[1] for line in lines})
    (tmp_path / "variants.txt").write_text("\n".join(variants) + "\n")
    for split in ("train", "val", "test"):
        shutil.copy(src, tmp_path / f"images_variant_{split}.txt")
    touch_tree(tmp_path, "images", {line.split(" ", 1)[0] + ".jpg" for line in lines})
    data = read_coop_dataset("fgvc", tmp_path)
    assert data.num_classes == 100 and len(data.train) == 3334
    assert "BAE 146-200" in data.classnames     # variant names with spaces survive
    image_id, variant = lines[0].split(" ", 1)
    assert data.train[0] == Datum(str(tmp_path / "images" / f"{image_id}.jpg"), variants.index(variant), variant)


def test_clear_errors_for_missing_root_split_and_bad_rows(tmp_path):
    with pytest.raises(RaftError, match="does not exist.*split_zhou_OxfordPets.json"):
        read_coop_dataset("oxford_pets", tmp_path / "nope")
    with pytest.raises(RaftError, match="split file missing.*split_zhou_DescribableTextures.json"):
        read_coop_dataset("dtd", tmp_path)
    (tmp_path / "split_zhou_EuroSAT.json").write_text('{"train": [["a.jpg", 0]], "val": [], "test": []}')
    with pytest.raises(RaftError, match=r"train\[0\].*not \[image_path, label, classname\]"):
        read_coop_dataset("eurosat", tmp_path)
    (tmp_path / "split_zhou_EuroSAT.json").write_text("{not json")
    with pytest.raises(RaftError, match="not valid JSON"):
        read_coop_dataset("eurosat", tmp_path)
    (tmp_path / "split_zhou_EuroSAT.json").write_text(
        '{"train": [["a.jpg", 0, "x"], ["b.jpg", 2, "z"]], "val": [], "test": []}')
    with pytest.raises(RaftError, match="0..C-1"):
        read_coop_dataset("eurosat", tmp_path)
    with pytest.raises(RaftError, match="main_imagenet.py"):
        read_coop_dataset("imagenet", tmp_path)


def make_items(counts):
    return [Datum(f"/img/{c}_{i}.jpg", c, f"class{c}") for c, n in enumerate(counts) for i in range(n)]


def test_few_shot_sampling_is_seeded_per_class_and_replaces_only_when_short():
    items = make_items([20, 20, 3])
    a = few_shot(items, 5, seed=1, num_classes=3)
    assert a == few_shot(items, 5, seed=1, num_classes=3)
    assert a != few_shot(items, 5, seed=2, num_classes=3)
    assert [sum(d.label == c for d in a) for c in range(3)] == [5, 5, 5]
    assert len({d.path for d in a if d.label == 0}) == 5        # no repeats when enough images
    assert {d.path for d in a if d.label == 2} <= {d.path for d in items if d.label == 2}


def test_validation_from_train_excludes_the_few_shot_set():
    items = make_items([30, 30])
    shots = few_shot(items, 8, seed=1, num_classes=2)
    val = validation_from_train(items, 10, 1, ["class0", "class1"], taken={d.path for d in shots})
    assert len(val) == 20 and not {d.path for d in val} & {d.path for d in shots}


def write_image_tree(folder: Path, classes, per_class=2):
    from PIL import Image
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), (i * 40, 80, 120)).save(folder / c / f"{i}.JPEG")


def test_imagenet_listing_is_cached_and_follows_every_change(tmp_path):
    import os
    import time

    import datasets.imagenet as imagenet
    wnids = ["n01440764", "n01443537", "n01484850"]
    (tmp_path / "classnames.txt").write_text("".join(f"{w} class {w}\n" for w in wnids))
    write_image_tree(tmp_path / "images" / "train", wnids, 3)
    write_image_tree(tmp_path / "images" / "val", wnids, 1)
    cache, listings = tmp_path / "cache", tmp_path / "cache" / "listings"

    def age():   # folders last changed a minute ago: old enough to be cached
        for folder in (tmp_path / "images").glob("*/*"):
            os.utime(folder, ns=(time.time_ns() - 60 * 10**9,) * 2)

    def read():
        data = read_imagenet(tmp_path, cache)
        fresh = read_imagenet(tmp_path)
        assert (data.train, data.test) == (fresh.train, fresh.test)
        return sorted(os.path.basename(d.path) for d in data.train)

    assert len(read()) == 9 and not listings.exists()          # just written: listed, not cached
    age()
    assert len(read()) == 9 and len(list(listings.iterdir())) == 2
    calls = []
    real = imagenet.image_names
    imagenet.image_names = lambda folder: calls.append(folder) or real(folder)
    try:
        assert len(read()) == 9 and len([c for c in calls if "train" in str(c)]) == 3   # the uncached read only
        train = tmp_path / "images" / "train"
        changes = [lambda: write_image_tree(train, [wnids[1]], 5),                     # files added
                   lambda: (train / wnids[0] / "0.JPEG").unlink(),                     # removed
                   lambda: (train / wnids[2] / "1.JPEG").rename(train / wnids[2] / "9.JPEG"),   # renamed
                   lambda: (train / wnids[2] / "9.JPEG").rename(train / wnids[2] / "9.txt")]    # no image any more
        for change in changes:
            change()
            age()
            assert read() == sorted(p.name for w in wnids for p in (train / w).iterdir() if p.suffix == ".JPEG")
            assert len(list(listings.glob("train_*"))) == 1                        # older states removed
        (next(listings.glob("train_*"))).write_bytes(b"\xff not json")             # a damaged cache: listed again
        assert len(read()) == 9 and len(list(listings.glob("train_*"))) == 1
        for damage in ({w: 5 for w in wnids}, {w: [1, 2] for w in wnids}, {w: "0.JPEG" for w in wnids},
                       {w: ["../../../etc/passwd"] for w in wnids}, {w: ["..", "0.JPEG"] for w in wnids}):
            next(listings.glob("train_*")).write_text(json.dumps(damage))       # JSON, right keys, wrong values
            assert len(read()) == 9
    finally:
        imagenet.image_names = real


def test_imagenet_layout_and_shift_sets(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    names = ["tench", "goldfish", "great white shark"]
    (tmp_path / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
    write_image_tree(tmp_path / "images" / "train", wnids, 3)
    write_image_tree(tmp_path / "images" / "val", wnids, 2)
    data = read_imagenet(tmp_path)
    assert data.classnames == names and len(data.train) == 9 and len(data.test) == 6 and data.val == []
    assert data.train[3].label == 1 and data.train[3].classname == "goldfish"
    v2 = tmp_path / "v2" / "imagenetv2-matched-frequency-format-val"
    write_image_tree(v2, ["0", "1", "2"], 1)
    shift = read_shift_set("imagenet_v2", tmp_path / "v2", wnids, names)
    assert len(shift.items) == 3 and shift.class_subset is None
    write_image_tree(tmp_path / "a", ["n01484850", "n01440764"], 1)
    sub = read_shift_set("imagenet_a", tmp_path / "a", wnids, names)
    assert sub.class_subset == [0, 2]
    with pytest.raises(RaftError, match="classnames.txt"):
        read_imagenet(tmp_path / "images")


def test_validation_draw_without_replacement_and_its_own_error():
    from datasets import validation_from_train
    from datasets.base import Datum
    train = [Datum(f"{c}{i}.jpg", label, c) for label, (c, n) in enumerate((("a", 10), ("b", 3))) for i in range(n)]
    val = validation_from_train(train, 4, 1, ["a", "b"], taken={"b0.jpg"})
    paths = [d.path for d in val]
    assert len(paths) == len(set(paths)) == 6 and "b0.jpg" not in paths    # b gives the 2 it has left
    with pytest.raises(RaftError, match="the validation draw failed: class 'b'"):
        validation_from_train(train, 4, 1, ["a", "b"], taken={"b0.jpg", "b1.jpg", "b2.jpg"})


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


# --------------------------------------------------------------------------- 1. paths from data files
@pytest.mark.parametrize("row", ["../../OUTSIDE.jpg", "/etc/passwd", "red_circle/../../../x.jpg", "..", ""])
def test_split_file_paths_stay_inside_the_image_folder(dtd, tmp_path, capsys, row):
    outside = dtd.parent / "OUTSIDE.jpg"           # a real image beside the data folder
    shutil.copy(next((dtd / "images" / "red_circle").glob("*.jpg")), outside)
    split = json.loads((dtd / SPLIT).read_text())
    split["train"][1][0] = row
    (dtd / SPLIT).write_text(json.dumps(split))
    code, _, err = cli(args_for(dtd, tmp_path), capsys)
    one_line_error(code, err, str(dtd / SPLIT), "train[1]")
    assert trained_nothing(tmp_path)


@pytest.mark.parametrize("line,fragment", [("../../etc/x", "not a folder name"), ("..", "not a folder name"),
                                           ("n01/../../b", "not a folder name")])
def test_imagenet_class_list_names_folders_not_paths(tmp_path, capsys, line, fragment):
    from datasets import read_imagenet
    from utils import RaftError
    (tmp_path / "classnames.txt").write_text(f"n0000001 cat\n{line} dog\n")
    with pytest.raises(RaftError, match=fragment) as info:
        read_imagenet(tmp_path)
    assert "classnames.txt:2" in str(info.value)


def test_fgvc_image_ids_stay_inside(tmp_path):
    from datasets import read_coop_dataset
    from utils import RaftError
    (tmp_path / "images").mkdir()
    (tmp_path / "variants.txt").write_text("707-320\nA300B4\n")
    for split in ("train", "val", "test"):
        (tmp_path / f"images_variant_{split}.txt").write_text("0034309 707-320\n../../../etc/passwd A300B4\n")
    with pytest.raises(RaftError, match="leaves the dataset folder") as info:
        read_coop_dataset("fgvc", tmp_path)
    assert "images_variant_train.txt:2" in str(info.value)


def test_a_symlinked_image_folder_is_followed(dtd, tmp_path):
    """The policy: links inside the dataset folder are its own layout (an images folder on
    another disk); only paths written in files are confined."""
    from datasets import read_coop_dataset
    elsewhere = tmp_path / "other_disk" / "images"
    elsewhere.parent.mkdir()
    shutil.move(str(dtd / "images"), elsewhere)
    (dtd / "images").symlink_to(elsewhere, target_is_directory=True)
    data = read_coop_dataset("dtd", dtd)
    assert len(data.train) == 18 and all(Path(d.path).is_file() for d in data.train)


def test_a_bom_and_crlf_are_read_as_the_text_they_hold(dtd, tmp_path):
    from datasets import read_coop_dataset, read_imagenet
    from run.config import build_config
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xef\xbb\xbfdataset: dtd\r\ndata_path: x\r\nlr: 2.0e-4\r\n")
    assert build_config(cfg, {}).lr == 2e-4
    split = dtd / SPLIT
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes().replace(b"], [", b"],\r\n["))
    assert read_coop_dataset("dtd", dtd).num_classes == 3
    imagenet = tmp_path / "imagenet"
    (imagenet / "images" / "train" / "n01").mkdir(parents=True)
    (imagenet / "images" / "val" / "n01").mkdir(parents=True)
    for split_name in ("train", "val"):
        Image.new("RGB", (8, 8)).save(imagenet / "images" / split_name / "n01" / "a.jpg")
    for lines in (b"\xef\xbb\xbfn01\tgreat white shark\r\n", b"n01    great white shark\n",
                  b"n01 \t great white shark  \n"):
        (imagenet / "classnames.txt").write_bytes(lines)
        assert read_imagenet(imagenet).classnames == ["great white shark"]


def test_a_split_file_with_a_stray_byte(dtd, tmp_path, capsys):
    split = dtd / SPLIT
    split.write_bytes(split.read_bytes().replace(b"red circle", b"red c\xefrcle", 1))
    one_line_error(*cli(args_for(dtd, tmp_path), capsys)[::2], "split file", "not UTF-8 text", "0xef")


# --------------------------------------------------------------------------- 5. names that are not UTF-8
@pytest.mark.slow
def test_file_and_class_names_that_are_not_utf8(demo_root, tmp_path, capsys):
    """A class folder b't\\xefit' and files b'img_\\xff\\xfe.jpg' (bytes of another encoding):
    trained on, hashed, saved, printed, predicted (--json) and drawn, each without a traceback."""
    root = tmp_path / "birds"
    names = {os.fsdecode(b"t\xefit"): "red_circle", os.fsdecode(b"r\xf6dhake"): "blue_square",
             "wren": "green_triangle"}
    for folder, source in names.items():
        (root / folder).mkdir(parents=True)
        for i, src in enumerate(sorted((demo_root / "images" / source).glob("*.jpg"))[:8]):
            shutil.copy(src, root / folder / os.fsdecode(b"img_\xff\xfe%d.jpg" % i))
    argv = ["--config", str(ROOT / "configs/folder.yaml"), "--data_path", str(root), "--backbone", "tiny-rn",
            "--weights", "null", "--calibrate_bn", "true", "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), "--train_epoch", "2", "--warmup_epoch", "1", "--shots", "2",
            "--num_workers", "0", "--baselines", "[]", "--name", ""]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    run = tmp_path / "out" / "birds" / "tiny-rn_2shots_seed1"
    fewshot = json.loads((run / "fewshot.json").read_text())
    assert any("\\xef" in row[2] for row in fewshot["items"])                # class name shown as its bytes
    assert any(os.fsencode(row[0]).endswith(b"\xfe0.jpg") or b"\xfe" in os.fsencode(row[0])
               for row in fewshot["items"])                                 # the path reads back as the file's
    image = sorted((root / os.fsdecode(b"t\xefit")).iterdir())[0]
    code, out, err = cli([str(run), str(image), "--json", str(tmp_path / "p.json")], capsys, entry="scripts.predict")
    assert code == 0 and "Traceback" not in err, err
    report = json.loads((tmp_path / "p.json").read_text())
    assert os.fsencode(report["predictions"][0]["image"]) == os.fsencode(str(image))   # the file's own bytes
    assert "\\xff\\xfe0.jpg" in out
    code, out, err = cli([str(run), str(image), "--out", str(tmp_path / "vis")], capsys, entry="scripts.visualize")
    assert code == 0 and len(list((tmp_path / "vis").iterdir())) == 1, err


# --------------------------------------------------------------------------- 7. malformed files that load
def test_split_files_that_load_but_cannot_be_used(dtd, tmp_path, capsys):
    split = json.loads((dtd / SPLIT).read_text())
    (dtd / SPLIT).write_text(json.dumps(split | {"test": []}))
    one_line_error(*cli(args_for(dtd, tmp_path), capsys)[::2], "the test split of dtd is empty")
    assert not run_dir(tmp_path).exists()
    for label in (10 ** 12, -1, 5):     # labels checked against the rows, never a range up to their maximum
        bad = json.loads(json.dumps(split))
        bad["train"][0][1] = label
        (dtd / SPLIT).write_text(json.dumps(bad))
        one_line_error(*cli(args_for(dtd, tmp_path), capsys)[::2], "labels must be 0..C-1", f"label {label}")


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
