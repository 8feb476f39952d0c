"""Whatever a user or a third-party file brings (doc/robustness.md, "Input kinds"): each test
is one kind of input, tried with several members of it; each ends in one line and exit code 2
(or works, where the input is unambiguous), never a traceback, never a runaway."""
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SPLIT, args_for, build_dtd, cli, one_line_error, poison_loss_at, run_dir


def trained_nothing(tmp_path):
    folder = run_dir(tmp_path)
    return not (folder / "checkpoint.pt").exists() and not (folder / "resume.pt").exists()


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


# --------------------------------------------------------------------------- 2. weights are data
class Payload(torch.nn.Module):
    """Ships TorchScript code in its archive: ``__setstate__`` runs inside torch.jit.load and
    creates a file through torch.from_file before any check could look at the weights."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.marker = marker

    def forward(self, x):
        return x + self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training, self.marker)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool, str]):
        self.training = state[1]
        self.marker = state[2]
        self.w = state[0] + torch.from_file(state[2], shared=True, size=2).sum() * 0


def zip_archive_with_a_global(path: Path, marker: Path) -> None:
    """A zip laid out as TorchScript whose data.pkl calls os.system."""
    import zipfile
    payload = b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(f"touch {marker}")) + \
        f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", payload)
        zf.writestr("evil/code/__torch__.py", "")
        zf.writestr("evil/version", "3\n")


def test_weights_files_never_run_code(tmp_path):
    from clip.backbone import load_open_clip
    from utils import RaftError
    marker = tmp_path / "created_by_the_archive"
    crafted = tmp_path / "crafted.pt"
    torch.jit.script(Payload(str(marker))).save(str(crafted))
    with pytest.raises(RaftError, match="holds no tensors"):
        load_open_clip("tiny-rn", str(crafted))
    assert not marker.exists()
    evil_zip = tmp_path / "evil.pt"
    zip_archive_with_a_global(evil_zip, marker)
    with pytest.raises(RaftError, match="names posix.system|names os.system"):
        load_open_clip("tiny-rn", str(evil_zip))
    assert not marker.exists()


class Reduce:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Plain:
    pass


@pytest.mark.parametrize("payload", ["os.system", "a class of its own", "a slice"])
def test_pickled_payloads_are_named_as_code(tmp_path, payload):
    """The same refusal for a weights file, a checkpoint, a resume state and a text cache,
    whatever words torch's unpickler uses."""
    from clip.backbone import load_open_clip
    from run.checkpoints import read_checkpoint
    from utils import RaftError, torch_load
    marker = tmp_path / "ran"
    obj = {"os.system": Reduce(marker), "a class of its own": Plain(), "a slice": slice(1, 2)}[payload]
    path = tmp_path / "payload.pt"
    torch.save({"pool": {"w": torch.zeros(1)}, "config": {}, "x": obj}, path)
    for load in (lambda: load_open_clip("tiny-rn", str(path)), lambda: read_checkpoint(path),
                 lambda: torch_load(path, "resume state")):
        with pytest.raises(RaftError, match="needs pickled Python code"):
            load()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(RaftError, match="needs pickled Python code"):
        torch_load(raw, "text cache")
    assert not marker.exists()


def test_a_torchscript_archive_reads_as_the_model_it_holds(tmp_path, tiny_clip):
    from clip.torchscript import read_torchscript_weights
    archive = tmp_path / "tiny.pt"
    torch.jit.script(tiny_clip.model).save(str(archive))
    weights = read_torchscript_weights(archive)
    reference = tiny_clip.model.state_dict()
    assert set(reference) <= set(weights)
    assert all(torch.equal(weights[k], reference[k]) and weights[k].dtype == reference[k].dtype for k in reference)


# --------------------------------------------------------------------------- 4. text that is not UTF-8
@pytest.mark.parametrize("content,fragments", [
    ("dataset: dtd\ndata_path: x\n# caf\xe9 au lait\n".encode("latin-1"), ["not UTF-8 text", "line 3", "0xe9"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["not UTF-8 text", "line 1"]),
    (b"dataset: dtd\x00\x00", ["binary file"]),
    ("dataset: dtd\n".encode("utf-16"), ["not UTF-8 text"]),
    (b"dataset: dtd\ndata_path: x\nlr: 1e-4\nlr: 2e-4\n", ["key 'lr' is given twice", "lines 3 and 4"]),
])
def test_config_files_that_are_not_utf8_text(tmp_path, capsys, content, fragments):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    one_line_error(*cli(["--config", str(cfg)], capsys)[::2], *fragments)


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
    code, out, err = cli([str(run), str(image), "--json", str(tmp_path / "p.json")], capsys, entry="predict")
    assert code == 0 and "Traceback" not in err, err
    report = json.loads((tmp_path / "p.json").read_text())
    assert os.fsencode(report["predictions"][0]["image"]) == os.fsencode(str(image))   # the file's own bytes
    assert "\\xff\\xfe0.jpg" in out
    code, out, err = cli([str(run), str(image), "--out", str(tmp_path / "vis")], capsys, entry="visualize")
    assert code == 0 and len(list((tmp_path / "vis").iterdir())) == 1, err


# --------------------------------------------------------------------------- 6. every number has a range
@pytest.mark.parametrize("args,fragments", [
    (["--seed", str(2 ** 64)], ["'seed' must be >= 0 and <= 4294967295"]),
    (["--seed", "-1"], ["'seed' must be >= 0"]),
    (["--lr", "inf"], ["'lr' must be > 0 and <= 10"]),
    (["--lr", ".nan"], ["'lr' must be > 0"]),
    (["--tau1", "1e-300"], ["'tau1' must be >= 0.001"]),
    (["--alpha", "1.5"], ["'alpha' must be >= 0 and <= 1"]),
    (["--alpha", "-0.1"], ["'alpha' must be >= 0"]),
    (["--search_high", "2"], ["'search_high' must be >= 0 and <= 1"]),
    (["--min_lr", "1e-3", "--lr", "1e-4"], ["min_lr (0.001) is larger than lr (0.0001)"]),
    (["--lambda1", "-0.1"], ["'lambda1' must be >= 0"]),
    (["--lambda2", "-1"], ["'lambda2' must be >= 0"]),
    (["--dist_timeout", "1e30"], ["'dist_timeout' must be > 0 and <= 604800"]),
    (["--batch_size_by_shots", "{1: 0}"], ["'batch_size_by_shots' must map"]),
    (["--batch_size_by_shots", "{1: 64, 1: 32}"], ["key '1' is given twice"]),
    (["--split_fractions", "[.nan, 0.5, 0.5]"], ["'split_fractions' must be"]),
])
def test_every_number_in_a_config_has_a_range(args, fragments, capsys):
    one_line_error(*cli(["--config", str(ROOT / "configs/dtd.yaml"), *args], capsys)[::2], *fragments)


@pytest.mark.parametrize("entry,args,fragments", [
    ("predict", ["run", "x.jpg", "--batch-size", "0"], ["--batch-size", "between 1 and 1024"]),
    ("predict", ["run", "x.jpg", "--batch-size", "-1"], ["--batch-size", "between 1 and 1024"]),
    ("predict", ["run", "x.jpg", "--top-k", "0"], ["--top-k", "between 1"]),
    ("visualize", ["run", "x.jpg", "--out", "o", "--dpi", "0"], ["--dpi", "between 10 and 600"]),
    ("visualize", ["run", "x.jpg", "--out", "o", "--dpi", "1e9"], ["--dpi", "expects int"]),
    ("predict", ["run"], ["the following arguments are required: images"]),
    ("summarize", [], ["the following arguments are required: root"]),
])
def test_every_number_on_a_tools_command_line_has_a_range(entry, args, fragments, capsys):
    one_line_error(*cli(args, capsys, entry=entry)[::2], *fragments)


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
    one_line_error(*cli([str(run), str(image)], capsys, entry="predict")[::2], fragment)
    one_line_error(*cli([str(run), str(image), "--out", str(tmp_path / "v")], capsys, entry="visualize")[::2],
                   fragment)


@pytest.mark.parametrize("damage", ["{\"alpha\": ", "[]", "{\"alpha\": \"high\"}", "{\"alpha\": 7}"])
def test_a_damaged_results_file(trained, tmp_path, capsys, damage):
    root, tmp, folder = trained
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    (run / "results.json").write_text(damage)
    image = next((root / "images" / "red_circle").glob("*.jpg"))
    one_line_error(*cli([str(run), str(image)], capsys, entry="predict")[::2], "results file", "results.json")
    one_line_error(*cli([str(run), str(image), "--out", str(tmp_path / "v")], capsys, entry="visualize")[::2],
                   "results file")


def test_a_damaged_results_file_is_evaluated_again(trained, capsys):
    root, tmp, folder = trained
    before = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text("{\"alpha\": ")
    code, out, err = cli(args_for(root, tmp, "--baselines", "[]"), capsys)
    assert code == 0 and "evaluating the run again" in err and "training already finished" in out
    assert json.loads((folder / "results.json").read_text())["test_acc"] == before["test_acc"]


# --------------------------------------------------------------------------- 8. images of every mode
def png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_high_bit_depth_images_read_as_their_8_bit_twins(tmp_path):
    from datasets.loader import read_rgb
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    grey16 = grey8.astype(np.uint16) * 257
    twin = np.array(Image.fromarray(grey8, "L").convert("RGB"))
    files = {}
    Image.fromarray(grey16).save(files.setdefault("I;16 png", tmp_path / "g16.png"))
    Image.fromarray(grey16).save(files.setdefault("I;16 tiff", tmp_path / "g16.tif"))
    Image.frombuffer("I;16B", (10, 12), grey16.astype(">u2").tobytes(), "raw", "I;16B", 0, 1).save(
        files.setdefault("I;16B tiff", tmp_path / "g16b.tif"))
    Image.fromarray(grey16).save(files.setdefault("I (16-bit pgm)", tmp_path / "g16.pgm"))
    Image.fromarray((grey8 / 255).astype(np.float32)).save(files.setdefault("F tiff", tmp_path / "f.tif"))
    modes = {}
    for name, path in files.items():
        modes[name] = Image.open(path).mode
        assert np.array_equal(np.array(read_rgb(str(path))), twin), name
    assert set(modes.values()) == {"I;16", "I;16B", "I", "F"}
    rgb8 = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    png16_rgb(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    assert np.array_equal(np.array(read_rgb(str(tmp_path / "rgb16.png"))), rgb8)


def test_images_without_an_unambiguous_8_bit_reading_are_refused(tmp_path):
    from datasets.loader import UnreadableImage, read_rgb
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(tmp_path / "f.tif")       # floats beyond 0..1
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "i32.tif")     # 32-bit integer samples
    for name, mode in (("f.tif", "mode F"), ("i32.tif", "mode I")):
        with pytest.raises(UnreadableImage, match=mode) as info:
            read_rgb(str(tmp_path / name))
        assert name in str(info.value)


# --------------------------------------------------------------------------- 10. sizes that cannot be meant
@pytest.mark.parametrize("args,fragments", [
    (["--shots", "100000"], ["'shots' must be > 0 and <= 10000"]),
    (["--shots", "17"], ["shots 17 is more than any class of dtd has training images", "at most 16"]),
    (["--search_step", "200000000"], ["'search_step' must be > 0 and <= 1000"]),
    (["--train_views", "1000000"], ["'train_views' must be > 0 and <= 100"]),
    (["--num_workers", "100000"], ["'num_workers' must be >= 0 and <= 64"]),
    (["--eval_batch_size", "1000000000"], ["'eval_batch_size' must be > 0 and <= 4096"]),
])
def test_sizes_that_cannot_be_meant_stop_before_the_work(dtd, tmp_path, capsys, args, fragments):
    one_line_error(*cli(args_for(dtd, tmp_path, *args), capsys)[::2], *fragments)
    assert trained_nothing(tmp_path)


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


# --------------------------------------------------------------------------- 12. dist_exact's shares
def test_share_rounding_is_probed(tiny_clip, monkeypatch):
    """The probe compares an image's trunk output inside each process's share with the same
    image inside the whole batch; a trunk whose last bits depend on the batch size is found."""
    from features import share_rounding
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = share_rounding(tiny_clip, [10, 2], 2, torch.device("cpu"), False)
        assert probe["exact"] and probe["share_sizes"] == [1, 5] and probe["global_batches"] == [2, 10]
        real = type(tiny_clip).encode_image
        monkeypatch.setattr(type(tiny_clip), "encode_image",
                            lambda self, x: tuple(t + 1e-7 * x.shape[0] for t in real(self, x)))
        probe = share_rounding(tiny_clip, [10], 2, torch.device("cpu"), False)
        assert not probe["exact"] and probe["max_difference"] > 0
    finally:
        torch.set_num_threads(threads)
