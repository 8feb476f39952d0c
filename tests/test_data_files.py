"""The data on-ramp (doc/datasets.md): fetching the published split and description files,
verified, from a server on 127.0.0.1; checking dataset trees built from the real split files;
the folder layouts people have."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from conftest import ROOT, cli, one_line_error, shared_fixture

sys.path.insert(0, str(ROOT / "scripts"))

from datasets.published import PUBLISHED_FILES, git_blob_id  # noqa: E402


def test_the_pinned_table_is_the_published_one():
    """datasets/published.py carries the facts of ../shared/fixtures/published_files.tsv (the
    chat variant of Caltech101's descriptions is the one file no dataset here reads)."""
    rows = [line.split("\t") for line in shared_fixture("published_files.tsv").read_text().splitlines()
            if line and not line.startswith(("#", "path\t"))]
    pins = {path: (blob, size) for path, blob, size in rows}
    ours = {f.path: (f.git_blob, "" if f.size is None else str(f.size)) for f in PUBLISHED_FILES}
    assert set(pins) - set(ours) == {"gpt_file/caltech101_prompt_chat.json"}
    assert all(pins[path] == pin for path, pin in ours.items())


def test_the_blob_id_is_gits_and_one_byte_changes_it():
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"   # git hash-object
    data = shared_fixture("coop_splits", "split_zhou_DescribableTextures.json").read_bytes()
    assert git_blob_id(data) == "8dd197a94b598fa44ee3c9e35c486dd017ab00a7"
    changed = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
    assert git_blob_id(changed) != git_blob_id(data)


# --------------------------------------------------------------------------- get_files against a local server
@pytest.fixture()
def mirror(tmp_path):
    """The published repository's paths served from a temporary folder: dtd's files as they are,
    oxford_pets' split with one byte changed, its descriptions cut short, eurosat's absent."""
    served = tmp_path / "served"
    (served / "datasets" / "jsons").mkdir(parents=True)
    (served / "gpt_file").mkdir()
    shutil.copy(shared_fixture("coop_splits", "split_zhou_DescribableTextures.json"), served / "datasets" / "jsons")
    shutil.copy(shared_fixture("descriptions", "dtd_prompt.json"), served / "gpt_file")
    pets = shared_fixture("coop_splits", "split_zhou_OxfordPets.json").read_bytes()
    (served / "datasets" / "jsons" / "split_zhou_OxfordPets.json").write_bytes(pets.replace(b"Abyssinian", b"Abyssinien", 1))
    prompts = shared_fixture("descriptions", "oxford_pets_prompt.json").read_bytes()
    (served / "gpt_file" / "oxford_pets_prompt.json").write_bytes(prompts[: len(prompts) // 2])
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fetch(base, tmp_path, capsys, *datasets, extra=()):
    argv = [*datasets, "--data_root", str(tmp_path / "data"), "--descriptions_dir", str(tmp_path / "gpt3_file"),
            "--base-url", base, *extra]
    return cli(argv, capsys, entry="get_files")


def leftovers(tmp_path):
    """Temporary siblings a download left behind (hidden files: atomic_write's, or older .part)."""
    return [p for p in tmp_path.rglob(".*") if p.is_file()]


@pytest.mark.slow
def test_files_are_verified_before_they_are_moved_into_place(mirror, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, out, err = fetch(mirror, tmp_path, capsys, "dtd", "oxford_pets", "eurosat")
    assert code == 2
    split = tmp_path / "data" / "dtd" / "split_zhou_DescribableTextures.json"
    assert split.read_bytes() == shared_fixture("coop_splits", "split_zhou_DescribableTextures.json").read_bytes()
    assert (tmp_path / "gpt3_file" / "dtd_prompt.json").is_file()
    assert "the pinned one fa821d9f9e7d32fdf3640bf74fa7491ed04f37da" in err          # the corrupted split: both ids
    assert "the pinned one 725ce24eebc21a26e646417150c4ca8d81029ac1" in err          # the truncated descriptions
    assert "HTTP 404" in err                                                         # eurosat's are absent
    assert not (tmp_path / "data" / "oxford_pets" / "split_zhou_OxfordPets.json").exists()
    assert not (tmp_path / "gpt3_file" / "oxford_pets_prompt.json").exists() and not leftovers(tmp_path)
    assert "Traceback" not in err
    code, out, _ = fetch(mirror, tmp_path, capsys, "dtd")                            # again: nothing to do
    assert code == 0 and out.count("present") == 2 and "2 of 2 files in place and verified" in out
    split.write_bytes(split.read_bytes()[:-1] + b" ")                                # edited by hand
    code, _, err = fetch(mirror, tmp_path, capsys, "dtd")
    assert code == 2 and "differs" in err and split.read_bytes().endswith(b" ")     # kept
    assert fetch(mirror, tmp_path, capsys, "dtd", extra=["--force"])[0] == 0         # replaced on request
    assert git_blob_id(split.read_bytes()) == "8dd197a94b598fa44ee3c9e35c486dd017ab00a7"
    umask = os.umask(0)
    os.umask(umask)
    assert split.stat().st_mode & 0o777 == 0o666 & ~umask      # readable as any file this user writes


def test_an_unreachable_server_is_one_line_in_seconds(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed once the block ends: connections are refused
    (tmp_path / "data").mkdir()
    start = time.monotonic()
    code, _, err = fetch(f"http://127.0.0.1:{port}", tmp_path, capsys, "dtd")
    one_line_error(code, err, "cannot reach http://127.0.0.1", "Connection refused")
    assert time.monotonic() - start < 10 and not list((tmp_path / "data").rglob("*"))


@pytest.mark.parametrize("args,fragment", [(["dtdd"], "unknown dataset 'dtdd' (did you mean 'dtd'?)"),
                                           (["--data_root", "/no/such/root"], "--data_root /no/such/root is not a folder"),
                                           (["demo"], "the published code ships no files for 'demo'")])
def test_get_files_bad_commands(args, fragment, capsys):
    one_line_error(*cli(args, capsys, entry="get_files")[::2], fragment)


def small_tmpfs(path, options):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs privileges)")


@pytest.mark.slow
def test_a_read_only_folder_and_a_full_disk(mirror, tmp_path, capsys):
    small_tmpfs(tmp_path / "data", "size=64k")        # the dtd split is 563 KB
    try:
        code, _, err = fetch(mirror, tmp_path, capsys, "dtd")
        assert code == 2 and "no space left on device" in err and not leftovers(tmp_path / "data")
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "data")], check=True)
        code, _, err = fetch(mirror, tmp_path, capsys, "dtd")
        assert code == 2 and ("read-only" in err or "Read-only" in err) and "Traceback" not in err
    finally:
        subprocess.run(["umount", str(tmp_path / "data")])


# --------------------------------------------------------------------------- check_data on trees from real splits
def build_tree(root, split_name, image_dir, limit=None, nested=False):
    """Every image a real split file lists (tiny generated JPEGs), in the dataset's layout."""
    split = shared_fixture("coop_splits", split_name)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(split, root / split_name)
    rows = [row for part in json.loads(split.read_text()).values() for row in part]
    img = root / ".one.jpg"
    Image.new("RGB", (8, 8), (90, 120, 30)).save(img)
    for path, _, _ in rows[:limit]:
        if nested:
            first, rest = path.split("/", 1)
            path = f"{first}/{first}/{rest}"
        target = root / image_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(img, target)
    return rows


def check(capsys, *args):
    code, out, err = cli([*args, "--json"], capsys, entry="check_data")
    return code, json.loads(out) if out.strip().startswith("[") else out, err


@pytest.mark.slow
def test_check_data_names_everything_missing_at_once(tmp_path, capsys):
    root = tmp_path / "data" / "dtd"
    rows = build_tree(root, "split_zhou_DescribableTextures.json", "images")
    code, reports, _ = check(capsys, "dtd", "--data_root", str(tmp_path / "data"))
    assert code == 0 and reports[0]["status"] == "ok" and reports[0]["split_file"] == "published"
    assert reports[0]["splits"]["train"] == {"listed": 2820, "missing": 0, "first_missing": []}
    removed = [rows[5][0], rows[3000][0], rows[4000][0]]                      # one train, one val, one test
    for path in removed:
        (root / "images" / path).unlink()
    victim = root / "images" / rows[10][0]
    victim.unlink()
    victim.write_bytes(b"not a jpeg")                                        # truncated / not an image
    code, reports, _ = check(capsys, "dtd", "--data_root", str(tmp_path / "data"), "--full")
    r = reports[0]
    assert code == 1 and r["status"] == "incomplete"
    assert [r["splits"][s]["missing"] for s in ("train", "val", "test")] == [1, 1, 1]
    assert r["splits"]["train"]["first_missing"] == [rows[5][0]]
    assert len(r["unreadable"]) == 1 and rows[10][0].split("/")[1] in r["unreadable"][0]
    code, out, _ = cli(["dtd", "--data_root", str(tmp_path / "data")], capsys, entry="check_data")
    assert code == 1 and "dtd: train: 1 of 2820 images missing under" in out and "2819/2820" in out


def test_check_data_tells_a_foreign_split_file(tmp_path, capsys):
    root = tmp_path / "data" / "dtd"
    root.mkdir(parents=True)
    shutil.copy(shared_fixture("coop_splits", "split_zhou_OxfordPets.json"), root / "split_zhou_DescribableTextures.json")
    code, reports, _ = check(capsys, "dtd", "--data_root", str(tmp_path / "data"))
    assert code == 1 and "is oxford_pets's published split file" in " ".join(reports[0]["problems"])
    (root / "split_zhou_DescribableTextures.json").write_text("{not json")
    code, reports, _ = check(capsys, "dtd", "--data_root", str(tmp_path / "data"))
    assert code == 1 and reports[0]["status"] == "error" and "not valid JSON" in reports[0]["problems"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,split,layouts", [
    ("stanford_cars", "split_zhou_StanfordCars.json", {"CoOp's": ("", False), "Kaggle's copy": ("", True)}),
    ("oxford_flowers", "split_zhou_OxfordFlowers.json", {"CoOp's": ("jpg", False),
                                                         "the published RAFT code's": ("data/jpg", False)}),
])
def test_the_layouts_people_have(tmp_path, capsys, dataset, split, layouts):
    from datasets import few_shot, read_coop_dataset, sample_digest
    digests = {}
    for name, (image_dir, nested) in layouts.items():
        data_root = tmp_path / name.replace(" ", "_").replace("'", "")
        folder = data_root / {"stanford_cars": "stanford_cars", "oxford_flowers": "oxford_flowers"}[dataset]
        build_tree(folder, split, image_dir, nested=nested)
        data = read_coop_dataset(dataset, folder)
        assert data.layout == name and all(os.path.isfile(d.path) for d in data.train[:50])
        digests[name] = sample_digest(few_shot(data.train, 2, 1, data.num_classes), data.image_root)
        code, reports, _ = check(capsys, dataset, "--data_root", str(data_root))
        assert code == 0 and reports[0]["layout"] == name            # check_data says which it recognised
    assert len(set(digests.values())) == 1          # the same images sampled, whatever the layout
    # both layouts at once: which files decide is named
    both = tmp_path / "both"
    for image_dir, nested in layouts.values():
        build_tree(both, split, image_dir, limit=20, nested=nested)
    from utils import RaftError
    with pytest.raises(RaftError, match="holds its images in two layouts"):
        read_coop_dataset(dataset, both)


def test_imagenet_class_lists_with_tabs_are_read_and_checked(tmp_path, capsys):
    root = tmp_path / "data" / "imagenet"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (root / "images" / split / wnid).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "images" / split / wnid / "a.JPEG")
    (root / "classnames.txt").write_text("n01440764\ttench\nn01443537  goldfish\nn01484850 great white shark\n")
    (root / "images" / "val" / "n01443537" / "a.JPEG").unlink()          # a class folder left empty
    code, reports, _ = check(capsys, "imagenet", "--data_root", str(tmp_path / "data"))
    r = reports[0]
    assert code == 1 and r["classes"] == "3" and r["splits"]["train"]["class_folders_missing"] == 1
    assert "1 of 3 class folders missing" in r["problems"][0] and "n01484850" in r["problems"][0]
    assert r["splits"]["train"]["listed"] == 2 and r["splits"]["val"]["listed"] == 1
    assert any("images/val: 1 class folders hold no image, e.g. n01443537" in p for p in r["problems"])


# --------------------------------------------------------------------------- answers that never end, or trickle
class Unending(SimpleHTTPRequestHandler):
    """Answers every GET with a body that never ends (``endless``) or a byte every 0.3 s (``trickle``)."""
    mode = "endless"

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(10 ** 6):
                self.wfile.write(b"{" * (1 << 16) if Unending.mode == "endless" else b" ")
                self.wfile.flush()
                if Unending.mode == "trickle":
                    time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("mode,fragment", [("endless", "longer than the"), ("trickle", "slower than")])
def test_a_download_stops_at_its_pinned_size_and_in_bounded_time(tmp_path, capsys, monkeypatch, mode, fragment):
    import datasets.fetch as fetching
    monkeypatch.setattr(fetching, "MIN_RATE", 1 << 20)   # the dtd split's 1.4 MB at 1 MiB/s: ~1.5 s of patience
    Unending.mode = mode
    (tmp_path / "data").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unending)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        code, out, err = fetch(f"http://127.0.0.1:{server.server_address[1]}", tmp_path, capsys, "dtd",
                               extra=("--timeout", "1"))
    finally:
        server.shutdown()
    assert code == 2 and fragment in err and "nothing written" in err, err
    assert time.monotonic() - start < 30 and not leftovers(tmp_path)
    assert not (tmp_path / "data" / "dtd" / "split_zhou_DescribableTextures.json").exists()


def test_check_data_checks_your_own_folder_anywhere_and_says_where_images_come_from(demo_root, tmp_path, capsys):
    folder = tmp_path / "somewhere" / "my_birds"
    for name in ("robin", "sparrow"):
        shutil.copytree(demo_root / "images" / "red_circle", folder / name)
    (folder / "robin" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code, out, _ = cli(["--folder", str(folder), "--full"], capsys, entry="check_data")
    assert code == 1 and "folder my_birds" in out and "class folders" in out and "broken.jpg" in out
    code, out, _ = cli(["--folder", str(tmp_path / "nowhere")], capsys, entry="check_data")
    assert code == 1 and "does not exist" in out
    code, out, _ = cli(["dtd", "--data_root", str(tmp_path)], capsys, entry="check_data")
    assert code == 1 and "doc/datasets.md says where its images come from" in out
    assert not list(tmp_path.rglob("*.json"))                  # a check writes nothing (no split recorded)
