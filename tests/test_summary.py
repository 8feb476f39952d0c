"""summarize.py: nothing but seeds is ever averaged; the field's table conventions; plots."""
import pytest
import json

from PIL import Image

from conftest import cli


def result(root, folder, **fields):
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    base = {"backbone": "RN50", "zero_shot_acc": 40.0, "num_classes": 10}
    (path / fields.pop("file", "results.json")).write_text(json.dumps(base | fields))


def summarize(root, tmp_path, capsys, *extra):
    code, out, err = cli([str(root), "--out", str(tmp_path / "sum"), "--no-plot", *extra], capsys, entry="scripts.summarize")
    assert code == 0, err
    return out, err


def test_runs_that_differ_in_anything_but_the_seed_are_never_averaged(tmp_path, capsys):
    root = tmp_path / "runs"
    for shots, acc in ((1, 100.0), (2, 93.33)):             # base-to-new at 1 and 2 shots: two rows, not two seeds
        result(root, f"dtd/RN50_{shots}shots_seed1_base2new", dataset="dtd", shots=shots, seed=1, protocol="base2new",
               test_acc=acc, base2new={"base": {"test_acc": acc, "zero_shot_acc": 50.0},
                                       "new": {"test_acc": acc, "zero_shot_acc": 40.0}})
    for shots in (4, 16):                                    # transfers from 4- and 16-shot sources
        result(root, f"imagenet/RN50_{shots}shots_seed1", dataset="imagenet", shots=shots, seed=1, test_acc=60.0)
        result(root, f"imagenet/RN50_{shots}shots_seed1", file="transfer_dtd.json", dataset="dtd", shots=shots,
               seed=1, test_acc=30.0 + shots)
    result(root, "dtd/ViT-B-16_4shots_seed1", dataset="dtd", shots=4, seed=1, test_acc=80.0, backbone="ViT-B-16")
    result(root, "dtd/RN50_4shots_seed1_lr=0.0002", dataset="dtd", shots=4, seed=1, test_acc=55.0)
    out, _ = summarize(root, tmp_path, capsys)
    b2n = (tmp_path / "sum" / "summary_RN50_base2new.md").read_text()
    assert "| dtd | 1 | 100.00 |" in b2n and "| dtd | 2 | 93.33 |" in b2n and "96.67" not in b2n
    transfer = (tmp_path / "sum" / "summary_RN50.md").read_text()
    assert "| imagenet | 4 | 60.00 | 34.00 | 34.00 |" in transfer and "| imagenet | 16 | 60.00 | 46.00 | 46.00 |" in transfer
    assert (tmp_path / "sum" / "summary_ViT-B-16.md").is_file() and (tmp_path / "sum" / "summary_RN50_lr=0.0002.md").is_file()


def test_runs_on_other_data_get_their_own_column_and_repeated_seeds_are_reported(tmp_path, capsys):
    root = tmp_path / "runs"
    for classes, acc, digest in ((100, 70.0, "aa11"), (1000, 50.0, "bb22")):
        result(root / f"study{classes}", "imagenet/RN50_16shots_seed1", dataset="imagenet", shots=16, seed=1,
               test_acc=acc, num_classes=classes, data_sha256=digest * 16)
    result(root / "again", "imagenet/RN50_16shots_seed1", dataset="imagenet", shots=16, seed=1, test_acc=71.0,
           num_classes=100, data_sha256="aa11" * 16)
    out, err = summarize(root, tmp_path, capsys)
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert "imagenet [100 classes, data aa11aa11]" in md and "imagenet [1000 classes, data bb22bb22]" in md
    assert "| 16 | 70.50 ± 0.50 | 50.00 |" in md                       # 100-class runs together, 1000 apart
    assert "seed 1 appears 2 times for imagenet [100 classes, data aa11aa11] at 16 shots" in md
    assert "warning: seed 1 appears 2 times" in err


def test_one_run_with_baselines_and_transfers_is_not_a_repeated_seed(tmp_path, capsys):
    root = tmp_path / "runs"
    methods = {name: {"test_acc": 50.0} for name in ("zero_shot", "linear_probe", "tip_adapter")}
    for seed in (1, 2):      # each folder: a few-shot row, a methods row and two transfer rows
        folder = f"imagenet/RN50_16shots_seed{seed}"
        result(root, folder, dataset="imagenet", shots=16, seed=seed, test_acc=60.0, baselines=methods)
        for target in ("dtd", "eurosat"):
            result(root, folder, file=f"transfer_{target}.json", dataset=target, shots=16, seed=seed, test_acc=30.0)
    out, err = summarize(root, tmp_path, capsys)
    assert "appears" not in out + err and "Repeated seed" not in (tmp_path / "sum" / "summary.md").read_text()


def test_other_text_sources_are_marked_and_tags_spelled_out(tmp_path, capsys):
    root = tmp_path / "runs"
    published = {"kind": "descriptions", "file": "gpt3_file/dtd_prompt.json", "git_blob": "8d66432094ad", "published": True}
    for seed in (1, 2):
        result(root, f"dtd/RN50_16shots_seed{seed}_lr=0.0002_and2more-cb65e2", dataset="dtd", shots=16, seed=seed,
               test_acc=70.0, text_source=published,
               config={"dataset": "dtd", "lr": 0.0002, "lambda2": 1.0, "tau1": 1.5, "shots": 16, "seed": seed})
    result(root, "dtd/RN50_4shots_seed1_lr=0.0002_and2more-cb65e2", dataset="dtd", shots=4, seed=1, test_acc=50.0,
           text_source={"kind": "templates", "templates": ["{} texture."]})
    summarize(root, tmp_path, capsys)
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert "| 4 | 50.00† |" in md and "† text from another source than the rest of the table" in md
    assert "Tag settings of RN50_lr=0.0002_and2more-cb65e2: lr=0.0002, lambda2=1.0, tau1=1.5." in md


@pytest.mark.slow
def test_plots_and_training_curves(tmp_path, capsys):
    root = tmp_path / "runs"
    history = [{"epoch": e, "loss": 3.0 / e, "train_acc": 10.0 * e, "lr": 1e-4 * e / 5} for e in range(1, 6)]
    for d in ("dtd", "eurosat", "ucf101", "fgvc", "food101", "sun397", "caltech101", "oxford_pets", "stanford_cars",
              "oxford_flowers", "imagenet"):
        for shots, acc in ((1, 40.0), (16, 70.0)):
            result(root, f"{d}/RN50_{shots}shots_seed1_lr=0.003_and2more-cb65e2", dataset=d, shots=shots, seed=1,
                   test_acc=acc, history=history)
    code, _, err = cli([str(root), "--out", str(tmp_path / "sum"), "--curves"], capsys, entry="scripts.summarize")
    assert code == 0, err
    for name in ("summary.png", "summary_curves.png"):
        with Image.open(tmp_path / "sum" / name) as img:
            assert img.format == "PNG" and img.width > 800


# --------------------------------------------------------------------------- damaged results among good ones
def test_damaged_results_files_are_named_and_left_out_the_summary_goes_on(tmp_path, capsys):
    import json
    import os
    from conftest import cli
    root = tmp_path / "runs"
    good = {"dataset": "dtd", "backbone": "RN50", "shots": 16, "test_acc": 70.0, "zero_shot_acc": 40.0}
    for seed in range(1, 201):   # 200 good runs of one cell
        folder = root / "dtd" / f"RN50_16shots_seed{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(good | {"seed": seed}))
    damaged = {
        "deep": "[" * 100_000 + "]" * 100_000,
        "accuracy_text": json.dumps(good | {"seed": 1, "test_acc": "high"}),
        "accuracy_nan": json.dumps(good | {"seed": 1, "test_acc": float("nan")}),
        "shift_list": json.dumps(good | {"seed": 1, "shift": [1, 2]}),
        "baseline_without_accuracy": json.dumps(good | {"seed": 1, "baselines": {"zero_shot": {"val_acc": 3}}}),
        "history_number": json.dumps(good | {"seed": 1, "history": 5}),
        "latin1": "{\"dataset\": \"d\xe9\"}",
        "a_list": "[1, 2, 3]",
    }
    for name, text in damaged.items():
        folder = root / "odd" / f"RN50_16shots_seed{name}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_bytes(text.encode("latin-1") if name == "latin1" else text.encode())
    fifo = root / "odd" / "RN50_16shots_seedfifo"
    fifo.mkdir()
    os.mkfifo(fifo / "results.json")
    code, out, err = cli([str(root), "--no-plot", "--out", str(tmp_path / "sum")], capsys, entry="scripts.summarize")
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipping ")]
    assert len(skipped) == len(damaged) + 1 and all("RN50_16shots_seed" in line for line in skipped)
    assert "Traceback" not in err and "| 16 | 70.00 ± 0.00 |" in out


def test_failed_and_skipped_methods_are_shown_so_and_published_numbers_beside_them(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, gda in ((1, {"test_acc": 70.0}), (2, {"failed": "linalg.pinv: did not converge"})):
        methods = {"zero_shot": {"test_acc": 40.0}, "gda": gda, "prolip": {"skipped": "no last projection"},
                   "tip_adapter_f": {"test_acc": 66.0 + seed}}
        result(root, f"dtd/RN50_16shots_seed{seed}", dataset="dtd", shots=16, seed=seed, test_acc=72.0,
               baselines=methods)
    out, err = summarize(root, tmp_path, capsys)
    md = (tmp_path / "sum" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| dataset | shots | RAFT"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in md.splitlines() if line.startswith("| dtd | 16 |") and "failed" in line)
    cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["GDA"] == "70.00 (1 failed)" and cells["ProLIP"] == "skipped"
    assert cells["Tip-Adapter-F"].startswith("67.50 ± 0.50")
    paper = next(line for line in md.splitlines() if line.startswith("| *published, RN50* | 16 |"))
    cells = dict(zip(columns, (c.strip() for c in paper.strip("|").split("|"))))
    assert cells["GDA"] == "*76.05*" and cells["Tip-Adapter-F"] == "*75.83*" and cells["ProLIP"] == "–"
    assert "damaged" not in err and "skipping" not in err
