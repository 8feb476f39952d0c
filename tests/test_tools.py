"""After training: predict.py, visualize.py, summarize.py, and `dataset: folder`."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, one_line_error
from utils import run_main

# --name "": the plain run-folder name although these settings differ from the config file
FAST = ["--name", "", "--train_epoch", "6", "--warmup_epoch", "1", "--batch_size", "16", "--num_workers", "0",
        "--lr", "3e-3", "--shots", "4"]


def cli(module_name, argv, capsys):
    import importlib
    module = importlib.import_module(module_name)
    code = run_main(module.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """A finished demo run (tiny CLIP), evaluated without the float16 feature cache."""
    import main
    work = tmp_path_factory.mktemp("trained")
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--data_path", str(demo_root), "--num_classes", "4",
            "--output_dir", str(work / "out"), "--cache_dir", str(work / "cache"), "--feature_cache", "false",
            *FAST]
    assert run_main(main.main, argv) == 0
    return work / "out" / "demo" / "tiny-rn_4shots_seed1"


@pytest.mark.slow
def test_predict_agrees_with_the_evaluation(trained, demo_root, tmp_path, capsys):
    results = json.loads((trained / "results.json").read_text())
    out = tmp_path / "pred.json"
    code, text, err = cli("scripts.predict", [str(trained), str(demo_root / "images"), "--top-k", "3", "--json", str(out)],
                          capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["alpha"] == results["alpha"]
    split = json.loads((demo_root / "split_zhou_Demo.json").read_text())
    label_of = {str(demo_root / "images" / p): y for s in split.values() for p, y, _ in s}
    test_paths = {str(demo_root / "images" / p) for p, _, _ in split["test"]}
    correct = n = 0
    for pred in report["predictions"]:
        top = pred["top"]
        assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
        assert 0 < sum(t["probability"] for t in top) <= 1 + 1e-6
        if pred["image"] in test_paths:
            n += 1
            correct += top[0]["label"] == label_of[pred["image"]]
    assert n == results["sizes"]["test"]
    # the fused prediction at the run's alpha reproduces its test accuracy (one near-tie may flip)
    assert abs(100 * correct / n - results["test_acc"]) <= 100 / n + 1e-9
    assert text.count("  1. ") == len(report["predictions"])


def test_predict_reports_unreadable_images_and_keeps_going(trained, demo_root, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    good = next((demo_root / "images" / "red_circle").glob("*.jpg"))
    code, out, err = cli("scripts.predict", [str(trained), str(bad), str(good)], capsys)
    assert code == 0 and str(good) in out and f"skipped unreadable image {bad}: not an image" in err
    code, _, err = cli("scripts.predict", [str(tmp_path / "no_run"), str(good)], capsys)
    assert code == 2 and "holds no checkpoint.pt" in err


@pytest.mark.slow
def test_attention_maps_are_distributions_and_pngs_are_written(trained, demo_root, tmp_path, capsys):
    from run.inference import attention_maps, load_images, load_run
    run = load_run(trained, "cpu")
    paths = sorted((demo_root / "images" / "yellow_star").glob("*.jpg"))[:3]
    _, images, _ = load_images(run, paths)
    maps = attention_maps(run, images)
    grid = run.clip.grid
    for name in ("class", "background", "clip"):
        m = maps[name]
        assert m.shape == (3, grid, grid) and (m >= 0).all()
        assert torch.allclose(m.sum((1, 2)), torch.ones(3), atol=1e-5)
    code, out, err = cli("scripts.visualize", [str(trained), *map(str, paths), "--out", str(tmp_path / "vis")], capsys)
    assert code == 0, err
    pngs = sorted((tmp_path / "vis").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(p.stem for p in paths)
    with Image.open(pngs[0]) as img:
        assert img.format == "PNG" and img.width > 3 * img.height
    # two folders with the same file name: the outputs keep the folders, never photo_.png
    for folder in ("a", "b"):
        (tmp_path / "same" / folder).mkdir(parents=True)
        shutil.copy(paths[0], tmp_path / "same" / folder / "photo.jpg")
    code, out, err = cli("scripts.visualize", [str(trained), str(tmp_path / "same"), "--out", str(tmp_path / "vis2")], capsys)
    assert code == 0, err
    assert sorted(str(p.relative_to(tmp_path / "vis2")) for p in (tmp_path / "vis2").rglob("*.png")) == \
        ["a/photo.png", "b/photo.png"]
    from scripts import visualize
    truth = visualize.true_labels(run)                          # the run's own dataset labels its images
    assert truth[str(paths[0].resolve())] == "yellow star"


def fake_results(root: Path, dataset: str, shots: int, seed: int, acc: float, zero: float = 40.0,
                 backbone: str = "RN50"):
    folder = root / dataset / f"{backbone}_{shots}shots_seed{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"dataset": dataset, "backbone": backbone, "shots": shots,
                                                     "seed": seed, "test_acc": acc, "zero_shot_acc": zero}))


def test_summary_puts_backbones_side_by_side(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (1, 2):
        fake_results(root, "dtd", 16, seed, 70.0 + seed)
        fake_results(root, "dtd", 16, seed, 75.0 + seed, zero=45.0, backbone="ViT-B-16")
    code, out, err = cli("scripts.summarize", [str(root), "--out", str(tmp_path / "sum"), "--no-plot"], capsys)
    assert code == 0, err
    md = (tmp_path / "sum" / "summary_all.md").read_text()
    assert "| backbone | setting | shots | dtd | Average |" in md
    assert "| RN50 | – | 16 | 71.50 ± 0.50 | 71.50 |" in md and "| ViT-B-16 | – | 16 | 76.50 ± 0.50 | 76.50 |" in md
    assert "| ViT-B-16 | – | zero-shot | 45.00 ± 0.00 | 45.00 |" in md
    rows = (tmp_path / "sum" / "summary_all.csv").read_text().splitlines()
    assert rows[0] == "backbone,group,dataset,shots,runs,mean,std" and "ViT-B-16,ViT-B-16,dtd,16,2,76.5000,0.5000" in rows
    assert (tmp_path / "sum" / "summary_RN50.md").is_file() and (tmp_path / "sum" / "summary_ViT-B-16.md").is_file()


def test_summary_table_csv_and_plot(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, acc in ((1, 70.0), (2, 72.0), (3, 74.0)):
        fake_results(root, "dtd", 16, seed, acc)
        fake_results(root, "eurosat", 16, seed, acc + 10)
    fake_results(root, "dtd", 1, 1, 50.0)                          # eurosat 1-shot is missing
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{")
    code, out, err = cli("scripts.summarize", [str(root), "--out", str(tmp_path / "sum")], capsys)
    assert code == 0, err
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert "| shots | dtd | eurosat | Average |" in md
    assert "| 16 | 72.00 ± 1.63 | 82.00 ± 1.63 | 77.00 |" in md      # numpy's (population) std, as CoOp's tables
    assert "| 1 | 50.00 | – | – |" in md                           # a gap, and no average over a gap
    assert "| zero-shot | 40.00 ± 0.00 | 40.00 ± 0.00 | 40.00 |" in md
    assert "std: the population standard deviation" in md
    rows = (tmp_path / "sum" / "summary.csv").read_text().splitlines()
    assert rows[0] == "group,dataset,shots,runs,mean,std,zero_shot_mean"
    assert "RN50,eurosat,16,3,82.0000,1.6330,40.0000" in rows and not any(",eurosat,1," in r for r in rows)
    tex = (tmp_path / "sum" / "summary.tex").read_text()
    assert "\\begin{tabular}" in tex and "72.00 $\\pm$ 1.63" in tex
    code, out, err = cli("scripts.summarize", [str(root), "--out", str(tmp_path / "sample"), "--no-plot", "--std", "sample"],
                         capsys)
    assert "| 16 | 72.00 ± 2.00 | 82.00 ± 2.00 | 77.00 |" in (tmp_path / "sample" / "summary.md").read_text()
    code, out, err = cli("scripts.summarize", [str(root), "--out", str(tmp_path / "ci"), "--no-plot", "--ci95"], capsys)
    ci = (tmp_path / "ci" / "summary.md").read_text()
    assert "| 16 | 72.00 ± 1.85 | 82.00 ± 1.85 | 77.00 |" in ci and "95% confidence interval" in ci
    with Image.open(tmp_path / "sum" / "summary.png") as img:
        assert img.format == "PNG"
    assert "skipping" in err and "broken" in err


@pytest.mark.slow
def test_own_folder_dataset(demo_root, tmp_path, capsys):
    root = tmp_path / "my_shapes"
    for name in ("red_circle", "blue_square", "green_triangle"):
        shutil.copytree(demo_root / "images" / name, root / name)
    argv = ["--config", str(ROOT / "configs/folder.yaml"), "--data_path", str(root), "--backbone", "tiny-rn",
            "--weights", "null", "--calibrate_bn", "true", "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), *FAST]
    code, out, err = cli("main", argv, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "my_shapes" / "tiny-rn_4shots_seed1" / "results.json").read_text())
    assert results["dataset"] == "my_shapes" and results["num_classes"] == 3
    assert results["sizes"] == {"train": 12, "val": 12, "test": 18}   # 20 images a class: 10 / 4 / 6
    split = json.loads(Path(results["split_file"]).read_text())
    assert len(split["train"]) == 30 and split["train"][0][2] == "blue_square"
    from datasets import read_folder_dataset
    again = read_folder_dataset(root, [0.5, 0.2, 0.3], 1, tmp_path / "cache")
    assert [d.path for d in again.test] == [str(root / p) for p, _, _ in split["test"]]   # seeded: the same split
    other = read_folder_dataset(root, [0.5, 0.2, 0.3], 2, tmp_path / "cache")
    assert {d.path for d in other.test} != {d.path for d in again.test}


def test_folder_dataset_with_given_splits(demo_root, tmp_path):
    from datasets import read_folder_dataset
    root = tmp_path / "given"
    for split, pattern in (("train", "train_*"), ("test", "test_*")):
        for name in ("red_circle", "blue_square"):
            (root / split / name).mkdir(parents=True)
            for f in (demo_root / "images" / name).glob(pattern):
                shutil.copy(f, root / split / name / f.name)
    data = read_folder_dataset(root, [0.5, 0.2, 0.3], 1, tmp_path / "cache")
    assert data.classnames == ["blue_square", "red_circle"] and data.val == [] and data.split_file is None
    assert len(data.train) == 16 and len(data.test) == 16


@pytest.mark.parametrize("entry,args,fragments", [
    ("scripts.predict", ["run", "x.jpg", "--batch-size", "0"], ["--batch-size", "between 1 and 1024"]),
    ("scripts.predict", ["run", "x.jpg", "--batch-size", "-1"], ["--batch-size", "between 1 and 1024"]),
    ("scripts.predict", ["run", "x.jpg", "--top-k", "0"], ["--top-k", "between 1"]),
    ("scripts.visualize", ["run", "x.jpg", "--out", "o", "--dpi", "0"], ["--dpi", "between 10 and 600"]),
    ("scripts.visualize", ["run", "x.jpg", "--out", "o", "--dpi", "1e9"], ["--dpi", "expects int"]),
    ("scripts.predict", ["run"], ["the following arguments are required: images"]),
    ("scripts.summarize", [], ["the following arguments are required: root"]),
])
def test_every_number_on_a_tools_command_line_has_a_range(entry, args, fragments, capsys):
    one_line_error(*cli(entry, args, capsys)[::2], *fragments)


# --------------------------------------------------------------------------- a tool writes only where its output option says
@pytest.mark.slow
def test_visualize_never_overwrites_one_output_with_another_nor_writes_elsewhere(trained, demo_root, tmp_path, capsys):
    source = next((demo_root / "images" / "red_circle").glob("*.jpg"))
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    with Image.open(source) as img:
        for name in ("photo.jpg", "photo.png", "photo.webp", "other.jpg", "sub/photo.jpg"):
            img.save(folder / name)
    before = sorted(p for p in tmp_path.rglob("*"))
    code, out, err = cli("scripts.visualize", [str(trained), str(folder), "--out", str(tmp_path / "vis")], capsys)
    assert code == 0, err
    written = sorted(str(p.relative_to(tmp_path / "vis")) for p in (tmp_path / "vis").rglob("*.png"))
    assert written == ["other.png", "photo.jpg.png", "photo.png.png", "photo.webp.png", "sub/photo.png"]
    assert sorted(p for p in tmp_path.rglob("*") if "vis" not in p.parts) == before   # nothing else written


@pytest.mark.slow
def test_visualize_of_a_run_whose_data_is_not_here_generates_nothing(trained, demo_root, tmp_path, capsys):
    """A demo run started elsewhere: its dataset is not generated again to label the images."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    missing = tmp_path / "elsewhere" / "demo"
    torch.save(ckpt | {"config": ckpt["config"] | {"data_path": str(missing), "cache_dir": str(tmp_path / "c")}},
               run / "checkpoint.pt")
    image = next((demo_root / "images" / "red_circle").glob("*.jpg"))
    code, _, err = cli("scripts.visualize", [str(run), str(image), "--out", str(tmp_path / "vis")], capsys)
    assert code == 0, err
    assert not missing.exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_predict_json_goes_where_it_is_told_and_never_over_an_input(trained, demo_root, tmp_path, capsys, monkeypatch):
    image = tmp_path / "photo.jpg"
    shutil.copy(next((demo_root / "images" / "red_circle").glob("*.jpg")), image)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("scripts.predict", [str(trained), str(image), "--json", "preds/p.json"], capsys)
    assert code == 0 and (tmp_path / "preds" / "p.json").is_file(), err
    for target in (str(image), str(tmp_path), str(trained / "results.json")):
        code, _, err = cli("scripts.predict", [str(trained), str(image), "--json", target], capsys)
        assert code == 2 and "--json" in err and "give a file of its own" in err
    assert image.stat().st_size > 100


def test_a_near_uniform_map_is_drawn_at_mid_scale_not_at_its_top():
    from scripts.visualize import colour_top
    uniform = {k: torch.full((7, 7), 1 / 49) for k in ("class", "background", "clip")}
    assert colour_top(uniform) == pytest.approx(2 / 49)          # every cell at half the scale
    peaked = dict(uniform, clip=torch.zeros(7, 7).index_fill_(0, torch.tensor([0]), 1 / 7))
    assert colour_top(peaked) == pytest.approx(1 / 7) and colour_top(peaked, 0.5) == 0.5
