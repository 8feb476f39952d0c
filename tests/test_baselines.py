"""The baselines (doc/baselines.md): correct against independent computations, selected on
validation data only, on the run's own images and cached features."""
import json
import logging
from dataclasses import replace

import pytest
import torch

from baselines import METHODS, BaselineData, run_baselines
from baselines.linear_probe import LogisticProblem
import baselines.tip_adapter as tip
from baselines.tip_adapter import cache_keys, check_fits, search_ab, tip_logits
from conftest import ROOT, args_for, cli, one_line_error
from utils import RaftError

LOG = logging.getLogger("test")


def clustered(n_per_class, classes=6, dim=32, spread=0.9, seed=0):
    """Features around class centres (unit norm), as CLIP's features of a few-shot task look."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))   # the same task for every split
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=-1), labels


def with_everything(data: BaselineData, test: torch.Tensor, seed: int = 9) -> BaselineData:
    """Every view set and ProLIP's features: the ground of every registered method."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = data.train.shape
    dassl = data.train + 0.4 * torch.randn(20, n, dim, generator=gen)
    width = dim + 8
    weight = torch.randn(width, dim, generator=gen) / width ** 0.5
    lift = torch.linalg.pinv(weight)             # pre-projection features that map back near v0
    pre = {"views": data.views @ lift, "weight": weight, "bias": None}
    if data.val is not None:
        pre["val"] = data.val @ lift
    pre["test_acc"] = test @ lift
    return replace(data, raw={"tip": data.views * 1.7, "dassl": dassl}, pre=pre, shots=len(data.train) // 6)


@pytest.fixture(scope="module")
def task():
    train, train_labels = clustered(8, seed=1)
    val, val_labels = clustered(6, seed=2)
    test, test_labels = clustered(20, seed=3)
    gen = torch.Generator().manual_seed(4)
    views = torch.nn.functional.normalize(train + 0.2 * torch.randn(10, *train.shape, generator=gen), dim=-1)
    centres = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))        # clustered()'s class centres
    text = torch.nn.functional.normalize(centres.T + 3.0 * torch.randn(32, 6, generator=gen), dim=0)  # a weak zero-shot
    data = with_everything(BaselineData(text, train, train_labels, views, val, val_labels, 100.0, 1), test)
    return data, test, test_labels


@pytest.mark.slow
@pytest.mark.parametrize("c", [1e-2, 1.0, 10.0, 100.0])
def test_linear_probe_matches_scikit_learn(task, c):
    from sklearn.linear_model import LogisticRegression
    data, test, test_labels = task
    w, b = LogisticProblem(data.train, data.train_labels, data.num_classes).fit(c)
    ours = 100.0 * ((test.double() @ w.T + b).argmax(1) == test_labels).double().mean().item()
    ref = LogisticRegression(C=c, max_iter=1000).fit(data.train.numpy(), data.train_labels.numpy())
    theirs = 100.0 * (ref.predict(test.numpy()) == test_labels.numpy()).mean()
    assert abs(ours - theirs) <= 0.5, (c, ours, theirs)


def test_linear_probe_without_validation_data_states_its_fixed_c(task):
    data, test, test_labels = task
    no_val = BaselineData(data.text, data.train, data.train_labels, data.views, None, None)
    out = run_baselines(["linear_probe"], no_val, {"test_acc": (test, test_labels, None)}, LOG)["linear_probe"]
    assert out["hyper"]["C"] == 1.0 and out["hyper"]["C_source"].startswith("fixed: no validation data")
    assert "val_acc" not in out


def direct_tip(data, features, keys, a, b):
    """Tip-Adapter's formula written out: 100·f·T + a·exp(-b(1 - f·Kᵀ))·L, L one-hot."""
    one_hot = torch.nn.functional.one_hot(data.train_labels, data.num_classes).float()
    return 100.0 * features @ data.text + a * torch.exp(-b * (1.0 - features @ keys.T)) @ one_hot


def test_tip_adapter_logits_are_the_formula_and_a_zero_is_zero_shot(task):
    data, test, _ = task
    keys = cache_keys(data.views)
    assert torch.allclose(keys, torch.nn.functional.normalize(data.views.mean(0), dim=-1))
    for a, b in ((1.0, 1.0), (2.3, 5.5)):
        assert torch.allclose(tip_logits(data, test, keys, data.train_labels, a, b), direct_tip(data, test, keys, a, b),
                              atol=1e-4)
    assert torch.equal(tip_logits(data, test, keys, data.train_labels, 0.0, 5.0), data.zero_shot_logits(test))


def published_search(data, keys):
    """The published a, b search written out: every (b, a) in turn, one logits matrix per point
    (``tip_logits``' arithmetic: zero-shot + a · cache term), a point replacing the best only
    when it has strictly more correct predictions, from none (the published best accuracy 0)."""
    def correct(logits):
        return int((logits.argmax(-1) == data.val_labels).sum())
    zero_shot = data.zero_shot_logits(data.val)
    best = (0.0, 0.0, 0)
    for b in tip.B_GRID:
        cache = tip.cache_term(data.val, keys, data.train_labels, data.num_classes, b)
        for a in tip.A_GRID:
            if correct(zero_shot + a * cache) > best[2]:
                best = (a, b, correct(zero_shot + a * cache))
    return {"a": best[0], "b": best[1], "ab_source": "val"}


def tip_task(classes, spread, text_noise):
    """A task whose validation accuracy is flat over much of the grid (many ties) or peaked."""
    train, train_labels = clustered(4, classes, 16, spread, seed=1)
    val, val_labels = clustered(10, classes, 16, spread, seed=2)
    gen = torch.Generator().manual_seed(4)
    views = torch.nn.functional.normalize(train + 0.3 * torch.randn(10, *train.shape, generator=gen), dim=-1)
    centres = torch.randn(classes, 16, generator=torch.Generator().manual_seed(0))   # clustered()'s centres
    text = torch.nn.functional.normalize(centres.T + text_noise * torch.randn(16, classes, generator=gen), dim=0)
    return BaselineData(text, train, train_labels, views, val, val_labels, 100.0, 1)


def test_cache_term_is_the_same_bits_with_and_without_autograd(task, monkeypatch):
    """Evaluation computes the cache term in place in one buffer, training through autograd:
    Tip-Adapter-F's keys are scored on validation exactly as their logits are trained."""
    data, test, _ = task
    keys = torch.nn.functional.normalize(cache_keys(data.views) + 0.3 * torch.randn(
        data.views.shape[1:], generator=torch.Generator().manual_seed(5)), dim=-1)
    for chunk in (tip.CHUNK, 2000, 7):   # one chunk; several; a row at a time
        monkeypatch.setattr(tip, "CHUNK", chunk)
        for b in (0.1, 3.7):
            with torch.no_grad():
                evaluated = tip.cache_term(test, keys, data.train_labels, data.num_classes, b)
            trained = tip.cache_term(test, keys.clone().requires_grad_(True), data.train_labels, data.num_classes, b)
            assert trained.requires_grad and torch.equal(evaluated, trained.detach()), (chunk, b)


@pytest.mark.slow
def test_tip_search_chooses_what_the_published_loop_chooses(task, monkeypatch):
    from dataclasses import replace
    cases = [(tip_task(10, 1.2, 3.0), 0.0), (tip_task(8, 1.0, 4.0), 0.0), (task[0], 0.3),
             (replace(tip_task(10, 0.8, 3.0), scale=0.0), 0.0)]   # no zero-shot term: every a of a b ties
    for n, (data, spread) in enumerate(cases):   # keys: the views' mean, or moved off it (as Tip-Adapter-F's)
        keys = torch.nn.functional.normalize(cache_keys(data.views) + spread * torch.randn(
            data.views.shape[1:], generator=torch.Generator().manual_seed(7)), dim=-1)
        expected = published_search(data, keys)
        for chunk in (tip.CHUNK, 2000, 7):    # one chunk; several, blended in parts; a row at a time
            monkeypatch.setattr(tip, "CHUNK", chunk)
            assert search_ab(data, keys, data.train_labels) == expected, (n, chunk)


def test_only_the_features_the_requested_methods_read_are_computed(task):
    data, test, test_labels = task
    for names, present in ((["zero_shot"], ()), (["linear_probe"], ("train",)), (["tip_adapter_f"], ("views:tip",)),
                           (["task_res", "clap"], ("views:dassl",)), (["prolip"], ("pre",))):
        needs = {n for name in names for n in METHODS[name].needs}
        assert needs == set(present)
        partial = replace(data, train=data.train if "train" in needs else None,
                          views=data.views if "views:tip" in needs else None,
                          raw={k: v for k, v in data.raw.items() if f"views:{k}" in needs},
                          pre=data.pre if "pre" in needs else {})
        out = run_baselines(names, partial, {"test_acc": (test, test_labels, None)}, LOG)
        full = run_baselines(names, data, {"test_acc": (test, test_labels, None)}, LOG)
        assert all(out[name]["test_acc"] == full[name]["test_acc"] for name in names)


def test_permuting_test_labels_changes_no_choice(task):
    data, test, test_labels = task
    shuffled = test_labels[torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(0))]
    names = list(METHODS)
    first = run_baselines(names, data, {"test_acc": (test, test_labels, None)}, LOG)
    again = run_baselines(names, data, {"test_acc": (test, shuffled, None)}, LOG)
    for name in names:
        assert first[name]["hyper"] == again[name]["hyper"], name
        assert first[name]["val_acc"] == again[name]["val_acc"]


def test_trained_baselines_learn_from_the_few_shot_images(task):
    data, test, test_labels = task
    out = run_baselines(list(METHODS), data, {"test_acc": (test, test_labels, None)}, LOG)
    assert not [name for name, r in out.items() if "failed" in r or "skipped" in r]
    assert out["linear_probe"]["test_acc"] > 60
    for name in ("tip_adapter", "tip_adapter_f", "gda", "lp_plus_plus", "ape", "ape_t", "clap", "task_res"):
        # each adds to a weak zero-shot classifier what the few-shot images teach
        assert out[name]["test_acc"] > out["zero_shot"]["test_acc"] + 5, (name, out[name], out["zero_shot"])
    assert out["tip_adapter_f"]["hyper"]["epoch"] >= 1 and "cached augmented views" in out["tip_adapter_f"]["note"]
    for name in ("task_res", "clip_adapter", "clap"):
        assert "cached views" in out[name]["note"]


def test_a_method_that_cannot_run_is_skipped_with_its_reason_and_one_that_fails_is_recorded(task, monkeypatch):
    data, test, test_labels = task
    refused = replace(data, pre={"refused": "tiny-siglip has no last projection to fine-tune: its head ..."})
    import baselines.gda as gda

    def singular(*args):
        raise torch.linalg.LinAlgError("linalg.pinv: The algorithm failed to converge")
    monkeypatch.setattr(gda, "discriminant", singular)
    out = run_baselines(["prolip", "gda", "tip_adapter"], refused, {"test_acc": (test, test_labels, None)}, LOG)
    assert out["prolip"] == {"skipped": "tiny-siglip has no last projection to fine-tune: its head ..."}
    assert out["gda"] == {"failed": "linalg.pinv: The algorithm failed to converge"}
    assert out["tip_adapter"]["test_acc"] > 0        # the others go on


@pytest.mark.parametrize("shots", [1, 2])
def test_every_method_runs_on_one_or_two_shots_and_on_classes_of_one_image(shots):
    train, labels = clustered(shots, seed=11)
    if shots == 2:                                  # class 0 keeps one image only
        train, labels = train[1:], labels[1:]
    val, val_labels = clustered(3, seed=12)
    test, test_labels = clustered(5, seed=13)
    views = torch.nn.functional.normalize(train + 0.2 * torch.randn(10, *train.shape,
                                                                    generator=torch.Generator().manual_seed(3)), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(32, 6, generator=torch.Generator().manual_seed(4)), dim=0)
    data = with_everything(BaselineData(text, train, labels, views, val, val_labels, 100.0, 1), test)
    out = run_baselines(list(METHODS), replace(data, shots=shots), {"test_acc": (test, test_labels, None)}, LOG)
    assert {name: r for name, r in out.items() if "test_acc" not in r} == {}


def test_a_cache_too_large_for_the_device_is_named(monkeypatch):
    import os
    monkeypatch.setattr(os, "sysconf", lambda name: 1024 if name == "SC_AVPHYS_PAGES" else 4096)  # 4 MiB free
    with pytest.raises(RaftError, match=r"Tip-Adapter's cache \(16000 keys × 1024 = 0\.06 GiB.*does not fit"):
        check_fits(torch.zeros(16000, 1024), torch.device("cpu"))


def test_unknown_method_names_the_closest(tmp_path, capsys):
    code, _, err = cli(["--config", str(ROOT / "configs/dtd.yaml"), "--baselines", "[tip_adaptr]"], capsys)
    one_line_error(code, err, "unknown baseline 'tip_adaptr'", "did you mean 'tip_adapter'")


# --------------------------------------------------------------------------- in a run
def demo_args(demo_root, tmp_path, *extra):
    return ["--config", str(ROOT / "configs/demo.yaml"), "--data_path", str(demo_root), "--num_classes", "4",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--shots", "8",
            "--train_epoch", "6", "--warmup_epoch", "1", "--batch_size", "16", "--num_workers", "0", "--name", "",
            *extra]


@pytest.mark.slow
def test_every_run_reports_the_baselines_from_cached_features(demo_root, tmp_path, capsys, monkeypatch):
    assert cli(demo_args(demo_root, tmp_path), capsys)[0] == 0
    folder = tmp_path / "out" / "demo" / "tiny-rn_8shots_seed1"
    results = json.loads((folder / "results.json").read_text())
    methods = results["baselines"]
    assert list(methods) == list(METHODS)
    assert methods["zero_shot"]["test_acc"] == results["zero_shot_acc"]       # the same features and text
    for name in ("linear_probe", "tip_adapter", "tip_adapter_f", "gda", "lp_plus_plus", "ape", "clap"):
        assert methods[name]["test_acc"] > 25, (name, methods[name])          # above chance (4 classes)
    for name in METHODS:
        assert "val_acc" in methods[name] and methods[name]["seconds"] >= 0, (name, methods[name])
    assert set(methods["tip_adapter"]["hyper"]) == {"a", "b", "ab_source"}
    # evaluating again recomputes nothing: val/test, the few-shot images and their views are cached
    from clip.backbone import FrozenCLIP
    calls = []
    real = FrozenCLIP.encode_image
    monkeypatch.setattr(FrozenCLIP, "encode_image", lambda self, x: calls.append(len(x)) or real(self, x))
    code, _, err = cli(demo_args(demo_root, tmp_path, "--eval-only"), capsys)
    assert code == 0, err
    assert not calls
    again = json.loads((folder / "results_eval.json").read_text())["baselines"]
    assert {k: v["test_acc"] for k, v in again.items()} == {k: v["test_acc"] for k, v in methods.items()}
    # a run that changes only RAFT's own settings reuses every method's result, recorded as reused
    code, _, err = cli(demo_args(demo_root, tmp_path, "--lr", "0.01", "--output_dir", str(tmp_path / "lr")), capsys)
    assert code == 0, err
    reused = json.loads((tmp_path / "lr" / "demo" / "tiny-rn_8shots_seed1" / "results.json").read_text())
    assert all("reused" in r for r in reused["baselines"].values())
    assert {k: v["test_acc"] for k, v in reused["baselines"].items()} == {k: v["test_acc"] for k, v in methods.items()}
    # baselines/run.py: the same numbers without training RAFT
    code, out, err = cli(demo_args(demo_root, tmp_path, "--output_dir", str(tmp_path / "alone")), capsys,
                         entry="scripts.run_baselines")
    assert code == 0, err
    alone = json.loads((tmp_path / "alone" / "demo" / "tiny-rn_8shots_seed1" / "baselines.json").read_text())
    assert {k: v["test_acc"] for k, v in alone["baselines"].items()} == {k: v["test_acc"] for k, v in methods.items()}
    code, out, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0 and "| demo | 8 | " in out and "Tip-Adapter-F" in out


def test_base_to_new_scores_zero_shot_on_both_and_the_rest_on_base(dtd, tmp_path, capsys, monkeypatch):
    import run.measure
    def no_views(*args, **kwargs):   # neither method reads Tip-Adapter's augmented views
        raise AssertionError("augmented views computed for methods that do not read them")
    monkeypatch.setattr(run.measure, "view_store", no_views)
    assert cli(args_for(dtd, tmp_path, "--protocol", "base2new", "--baselines", "[zero_shot, linear_probe]"),
               capsys)[0] == 0
    r = json.loads((tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1_base2new" / "results.json").read_text())
    zero, probe = r["baselines"]["zero_shot"], r["baselines"]["linear_probe"]
    assert {"base_acc", "new_acc", "hm"} <= set(zero) and "new_acc" not in probe
    assert zero["base_acc"] == r["base2new"]["base"]["zero_shot_acc"]
    assert zero["new_acc"] == r["base2new"]["new"]["zero_shot_acc"]
