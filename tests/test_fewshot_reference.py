"""The few-shot sample equals the published code's (../shared/fixtures/fewshot_reference.json),
and runs trained on an earlier version's sample are detected, not silently reused."""
import hashlib
import json
import os

import pytest

from conftest import args_for, cli, one_line_error, poison_loss_at, run_dir, shared_fixture
from datasets import few_shot, read_coop_dataset, sample_digest, save_list

SETTINGS = [(shots, seed) for shots in (1, 2, 4, 8, 16) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def reference():
    return json.loads(shared_fixture("fewshot_reference.json").read_text())["datasets"]


@pytest.fixture(scope="module")
def datasets(reference, tmp_path_factory):
    """Each dataset read from its real split file (no images are needed to sample)."""
    out = {}
    for name, entry in reference.items():
        root = tmp_path_factory.mktemp(name)
        os.symlink(shared_fixture("coop_splits", entry["split_file"]), root / entry["split_file"])
        out[name] = read_coop_dataset(name, root)
    return out


def split_paths(data, items):
    return [os.path.relpath(d.path, data.image_root) for d in items]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["oxford_pets", "dtd", "caltech101", "eurosat", "oxford_flowers", "stanford_cars",
                                  "ucf101"])
def test_every_shots_and_seed_matches_the_published_sampler(name, reference, datasets):
    data = datasets[name]
    for shots, seed in SETTINGS:
        items = few_shot(data.train, shots, seed, data.num_classes)
        expected = reference[name]["sha256"][f"{shots}shots_seed{seed}"]
        assert sample_digest(items, data.image_root) == expected, f"{name} {shots} shots seed {seed}"


@pytest.mark.parametrize("name", ["oxford_flowers", "stanford_cars", "oxford_pets"])
@pytest.mark.parametrize("shots", [1, 16])
def test_full_lists_in_sampling_order(name, shots, reference, datasets):
    data = datasets[name]
    mine = split_paths(data, few_shot(data.train, shots, 1, data.num_classes))
    theirs = reference[name]["lists"][f"{shots}shots_seed1"]
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    assert first is None and len(mine) == len(theirs), \
        f"{name} {shots} shots: first difference at position {first}: {mine[first]} here, {theirs[first]} published"


def test_fewshot_json_of_oxford_flowers_16_shots_seed_1_is_the_published_list(reference, datasets, tmp_path):
    data = datasets["oxford_flowers"]
    items = few_shot(data.train, 16, 1, data.num_classes)
    save_list(tmp_path / "fewshot.json", items, data.root, data.image_root, dataset=data.name, shots=16, seed=1)
    saved = json.loads((tmp_path / "fewshot.json").read_text())
    assert [os.path.relpath(data.root / row[0], data.image_root) for row in saved["items"]] == \
        reference["oxford_flowers"]["lists"]["16shots_seed1"]
    assert saved["sha256"] == reference["oxford_flowers"]["sha256"]["16shots_seed1"]
    published = "\n".join(reference["oxford_flowers"]["lists"]["16shots_seed1"])
    assert saved["sha256"] == hashlib.sha256(published.encode()).hexdigest()


# --------------------------------------------------------------------------- runs of earlier versions
def label_order_sample(data, shots, seed):
    """What versions before sampler 2 drew: the same calls, classes visited in label order."""
    import random
    rng = random.Random(seed)
    out = []
    for label in range(data.num_classes):
        pool = [d for d in data.train if d.label == label]
        out.extend(rng.sample(pool, shots) if len(pool) >= shots else rng.choices(pool, k=shots))
    return out


@pytest.fixture()
def shuffled_dtd(dtd):
    """The small dtd tree with its train list not in label order (as OxfordFlowers' is)."""
    path = dtd / "split_zhou_DescribableTextures.json"
    split = json.loads(path.read_text())
    split["train"] = sorted(split["train"], key=lambda row: -row[1])
    path.write_text(json.dumps(split))
    return dtd


def make_it_an_old_run(tmp_path, data):
    """Rewrite a finished run as an earlier version left it: its list in label order, no
    sample digest in the checkpoint, no results yet."""
    import torch
    folder = run_dir(tmp_path)
    old = label_order_sample(data, 4, 1)
    save_list(folder / "fewshot.json", old, data.root, dataset="dtd", shots=4, seed=1)
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    del ckpt["fewshot_sha256"]
    torch.save(ckpt, folder / "checkpoint.pt")
    (folder / "results.json").unlink()
    return folder


@pytest.mark.slow
def test_a_run_trained_on_the_old_sample_is_not_reused(shuffled_dtd, tmp_path, capsys):
    data = read_coop_dataset("dtd", shuffled_dtd)
    assert label_order_sample(data, 4, 1) != few_shot(data.train, 4, 1, 3)    # the two samplers disagree here
    assert cli(args_for(shuffled_dtd, tmp_path), capsys)[0] == 0
    folder = make_it_an_old_run(tmp_path, data)
    code, _, err = cli(args_for(shuffled_dtd, tmp_path), capsys)              # would evaluate the checkpoint
    one_line_error(code, err, "was trained on another few-shot sample", "label order", "--force")
    code, _, err = cli(args_for(shuffled_dtd, tmp_path, "--eval-only"), capsys)
    one_line_error(code, err, "was trained on another few-shot sample")
    assert not (folder / "results.json").exists() and not (folder / "results_eval.json").exists()
    code, _, err = cli(args_for(shuffled_dtd, tmp_path, "--force"), capsys)
    assert code == 0, err
    saved = json.loads((folder / "fewshot.json").read_text())
    assert saved["sampler"] == 2 and saved["sha256"] == sample_digest(few_shot(data.train, 4, 1, 3), data.image_root)


def test_a_resume_state_of_the_old_sample_is_not_resumed(shuffled_dtd, tmp_path, capsys, monkeypatch):
    poison_loss_at(monkeypatch, 3)
    cli(args_for(shuffled_dtd, tmp_path, "--save_every", "0"), capsys)
    monkeypatch.undo()
    assert (run_dir(tmp_path) / "resume.pt").is_file()
    data = read_coop_dataset("dtd", shuffled_dtd)
    save_list(run_dir(tmp_path) / "fewshot.json", label_order_sample(data, 4, 1), data.root)
    code, _, err = cli(args_for(shuffled_dtd, tmp_path), capsys)
    one_line_error(code, err, "was trained on another few-shot sample", "rerun with --force")
