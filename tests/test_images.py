"""Reading images: every mode, bit depth and damage; thousands of them on small machines."""
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SPLIT, args_for, cli, one_line_error, run_dir


# --------------------------------------------------------------------------- many images, few descriptors
@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(1600):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{i:05d}.jpg", quality=80)
    return root


DECODE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    import torch
    from datasets.base import Datum
    from run.features import LiveSource
    from clip.backbone import FrozenCLIP, load_open_clip
    items = [Datum(str(p), i % 4, "c") for i, p in enumerate(sorted(Path({images!r}).glob("*.jpg")))]
    clip = FrozenCLIP(load_open_clip("tiny-rn", None), "tiny-rn")
    source = LiveSource(clip, items, batch_size=64, seed=1, device=torch.device("cpu"), amp=False, num_workers=2)
    print("decoded", len(source.images))
""")


@pytest.mark.slow
def test_thousands_of_training_images_under_a_low_descriptor_limit(many_images, tmp_path):
    """Decoded images live in ordinary memory: no descriptor (nor /dev/shm segment) per image."""
    script = tmp_path / "decode.py"
    script.write_text(DECODE.format(root=str(ROOT), images=str(many_images)))

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          preexec_fn=low_limit)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decoded 1600" in proc.stdout


@pytest.mark.slow
def test_thousands_of_training_images_with_a_tiny_dev_shm(many_images, tmp_path):
    """Docker's default /dev/shm is 64 MB; here 1 MB, in a private mount namespace."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small /dev/shm")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("mount namespaces are not available here")
    script = tmp_path / "decode.py"
    script.write_text(DECODE.format(root=str(ROOT), images=str(many_images)))
    cmd = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && {sys.executable} {script}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decoded 1600" in proc.stdout


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


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    elif how == "not an image":
        path.write_text("this is text, not a JPEG")


@pytest.mark.parametrize("how,reason", [("missing", "file not found"), ("empty", "empty file"),
                                        ("truncated", "truncated"), ("not an image", "not an image")])
def test_unreadable_training_image_fails_before_training(dtd, tmp_path, capsys, how, reason):
    from datasets import few_shot, read_coop_dataset
    victim = Path(few_shot(read_coop_dataset("dtd", dtd).train, 4, 1, 3)[5].path)
    damage(victim, how)
    code, _, err = cli(args_for(dtd, tmp_path, "--calibrate_bn", "false"), capsys)
    one_line_error(code, err, "unreadable training image", str(victim), reason)
    assert not (run_dir(tmp_path) / "checkpoint.pt").exists()
    log = (run_dir(tmp_path) / "log.txt").read_text()
    assert "epoch   1/" not in log                      # stopped before any training step


@pytest.mark.slow
def test_unreadable_test_image_fails_or_is_skipped_and_counted(dtd, tmp_path, capsys):
    victim = dtd / "images" / "blue_square" / json.loads((dtd / SPLIT).read_text())["test"][3][0].split("/")[1]
    damage(victim, "truncated")
    code, _, err = cli(args_for(dtd, tmp_path), capsys)
    one_line_error(code, err, "unreadable image", str(victim), "bad_images: skip")
    code, _, err = cli(args_for(dtd, tmp_path, "--bad_images", "skip"), capsys)
    assert code == 0, err
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert results["skipped_images"] == {"val": 0, "test": 1} and results["sizes"]["test"] == 8
    assert str(victim) in results["skipped_files"]["test"][0]


# --------------------------------------------------------------------------- photos stored sideways
# What a reader does to an image stored with each EXIF orientation tag, to turn it upright
# (tag 6: the camera held upright, the sensor's rows are the photo's columns)
UPRIGHTING = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
UNDONE_BY = {tag: UPRIGHTING[{6: 8, 8: 6}.get(tag, tag)] for tag in UPRIGHTING}   # the inverse of each


def sideways(upright: Image.Image, path: Path, tag: int, kind: str = "JPEG") -> None:
    """``upright`` stored as a phone stores it: the pixels turned, the EXIF orientation saying how
    to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = tag
    options = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}.get(kind, {})
    upright.transpose(UNDONE_BY[tag]).save(path, kind, exif=exif, **options)


@pytest.mark.parametrize("tag", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("kind", ["JPEG", "PNG", "WEBP"])
def test_photos_stored_sideways_read_upright(tmp_path, tag, kind):
    from datasets.loader import read_rgb
    rng = np.random.default_rng(tag)
    upright = Image.fromarray(np.kron(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)))
    path = tmp_path / f"phone_{tag}.{kind.lower()}"
    sideways(upright, path, tag, kind)
    with Image.open(path) as raw:
        assert raw.size != upright.size or tag in (2, 3, 4)          # what a reader without EXIF sees
    read = np.asarray(read_rgb(str(path)), dtype=np.int16)
    assert read.shape == np.asarray(upright).shape
    assert np.abs(read - np.asarray(upright)).max() <= (12 if kind == "JPEG" else 0)


@pytest.mark.slow
def test_a_folder_of_phone_photos_scores_as_the_upright_one(tmp_path, capsys):
    """The run's test images stored sideways (tags 6 and 8) score exactly as their upright twins:
    training, evaluation (the cache), the baselines and predict all read them through one reader."""
    from conftest import ROOT
    from datasets.demo import draw_image
    import random
    shapes = {"red_circle": (220, 30, 30), "blue_square": (30, 30, 220), "green_triangle": (30, 190, 30)}
    roots = {}
    for variant in ("upright", "phone"):
        root = tmp_path / variant
        for name, colour in shapes.items():
            rng = random.Random(name)
            for split, count in (("train", 6), ("test", 4)):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    img = draw_image(name.split("_")[1], colour, 64, rng).resize((64, 48))
                    target = root / split / name / f"{i}.jpg"
                    if variant == "phone" and split == "test":
                        sideways(img, target, 6 if i % 2 else 8)
                    else:
                        img.save(target, quality=100, subsampling=0)
        roots[variant] = root
    accs = {}
    for variant, root in roots.items():
        argv = ["--config", str(ROOT / "configs/folder.yaml"), "--data_path", str(root), "--backbone", "tiny-rn",
                "--weights", "null", "--calibrate_bn", "true", "--shots", "4", "--train_epoch", "2",
                "--warmup_epoch", "1", "--batch_size", "8", "--num_workers", "0", "--alpha", "1",
                "--baselines", "[linear_probe]", "--output_dir", str(tmp_path / f"out_{variant}"),
                "--cache_dir", str(tmp_path / f"cache_{variant}"), "--name", ""]
        code, _, err = cli(argv, capsys)
        assert code == 0, err
        results = json.loads(next((tmp_path / f"out_{variant}").rglob("results.json")).read_text())
        accs[variant] = (results["test_acc"], results["baselines"]["linear_probe"]["test_acc"])
    assert abs(accs["phone"][0] - accs["upright"][0]) <= 100 / 12 and abs(accs["phone"][1] - accs["upright"][1]) \
        <= 100 / 12   # at most one image of twelve apart (JPEG's rounding of the turned pixels)


def test_an_old_feature_cache_built_from_sideways_images_is_not_reused():
    from run.features.store import CACHE_VERSION
    assert CACHE_VERSION >= 2   # version 1 read photos sideways: its stores are rebuilt, never read


# --------------------------------------------------------------------------- thin images, files that are not images
@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (3, 300), (2000, 40)])
def test_thin_images_are_refused_before_they_are_resized(tmp_path, size):
    from datasets.loader import UnreadableImage, read_rgb
    path = tmp_path / "thin.png"
    Image.new("RGB", size, (9, 9, 9)).save(path)
    with pytest.raises(UnreadableImage, match="times longer than it is wide"):
        read_rgb(str(path))


@pytest.mark.parametrize("size", [(10, 200), (300, 30), (64, 64)])
def test_panoramas_within_the_bound_are_read(tmp_path, size):
    from datasets.loader import read_rgb
    path = tmp_path / "wide.png"
    Image.new("RGB", size, (9, 9, 9)).save(path)
    assert read_rgb(str(path)).size == size


def special_files(folder: Path) -> dict[str, Path]:
    """Names of images that are not regular image files: a symlink loop, a dangling link, a
    folder, a FIFO (opening it would block), a device."""
    folder.mkdir(parents=True, exist_ok=True)
    loop, dangling, directory, fifo = (folder / n for n in ("loop.jpg", "dangling.jpg", "folder.jpg", "fifo.jpg"))
    os.symlink(loop, loop)
    os.symlink(folder / "nowhere.jpg", dangling)
    directory.mkdir()
    os.mkfifo(fifo)
    return {"a symlink loop": loop, "a dangling symlink": dangling, "a folder": directory, "a FIFO": fifo,
            "a device": Path("/dev/zero")}


def test_files_that_are_not_images_are_unreadable_never_a_hang(tmp_path):
    from datasets.loader import UnreadableImage, read_rgb
    for kind, path in special_files(tmp_path / "odd").items():
        with pytest.raises(UnreadableImage) as info:
            read_rgb(str(path))
        assert str(path) in str(info.value), kind


@pytest.mark.slow
def test_bad_images_skip_leaves_out_every_unreadable_test_image(dtd, tmp_path, capsys):
    """bad_images: skip leaves out a test image of any kind of unreadable (not only a missing one),
    counted in results.json; fail names the first."""
    split = json.loads((dtd / SPLIT).read_text())
    odd = special_files(tmp_path / "odd")
    for (kind, path), row in zip(odd.items(), split["test"]):
        target = dtd / "images" / row[0]
        target.unlink()
        os.symlink(path, target)   # the split file's name now points at the odd file
    code, _, err = cli(args_for(dtd, tmp_path), capsys)
    one_line_error(code, err, "unreadable image", "bad_images: skip")
    code, _, err = cli(args_for(dtd, tmp_path, "--bad_images", "skip"), capsys)
    assert code == 0, err
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert results["skipped_images"]["test"] == len(odd) and results["sizes"]["test"] == 9 - len(odd)
