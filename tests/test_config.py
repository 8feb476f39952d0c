"""Layered config: schema <- YAML <- command line; clear one-line errors; the shipped configs."""
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from utils import RaftError
from run.config import SCHEMA, build_config, parse_args

# doc/method.md §8: dataset -> (classes, batch, lambda2)
REFERENCE = {
    "imagenet": (1000, 128, 1.0), "sun397": (397, 128, 0.5), "caltech101": (100, 64, 0.5), "dtd": (47, 64, 0.5),
    "eurosat": (10, 64, 0.5), "fgvc": (100, 64, 0.5), "food101": (101, 64, 0.5), "oxford_flowers": (102, 64, 0.5),
    "oxford_pets": (37, 64, 0.5), "stanford_cars": (196, 64, 0.5), "ucf101": (101, 64, 0.5),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_shipped_configs_hold_the_reference_hyper_parameters(name):
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = build_config(path, {})
    classes, batch, lambda2 = REFERENCE[name]
    assert (cfg.dataset, cfg.num_classes, cfg.batch_size, cfg.lambda2) == (name, classes, batch, lambda2)
    assert (cfg.lr, cfg.train_epoch, cfg.shots, cfg.seed, cfg.lambda1, cfg.tau1, cfg.tau2) == \
        (1e-4, 50, 16, 1, 0.1, 2.0, 3.0)
    assert (cfg.search_low, cfg.search_high, cfg.search_step, cfg.backbone) == (0.0, 1.0, 50, "RN50")
    assert not Path(cfg.data_path).is_absolute()
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(SCHEMA)


def test_overrides_types_and_frozen(tmp_path):
    cfg, flags = parse_args(["--config", str(ROOT / "configs/dtd.yaml"), "--shots", "4", "--lr=2e-4",
                             "--train-epoch", "3", "--warmup_epoch", "1", "--alpha", "null", "--eval-only"], "t")
    assert (cfg.shots, cfg.lr, cfg.train_epoch, cfg.alpha) == (4, 2e-4, 3, None) and flags.eval_only
    assert isinstance(cfg.lr, float)
    with pytest.raises(TypeError):
        cfg["lr"] = 1.0


@pytest.mark.parametrize("args,message", [
    (["--lamda2", "1"], "unknown config key 'lamda2'.*did you mean 'lambda2'"),
    (["--batchsize", "8"], "did you mean 'batch_size'"),
    (["--shots", "four"], "'shots' expects int"),
    (["--shots", "0"], "'shots' must be > 0"),
    (["--lr", "-1"], "'lr' must be > 0"),
    (["--batch_size", "0"], "'batch_size' must be > 0"),
    (["--search_low", "0.8", "--search_high", "0.2"], "empty alpha search range"),
    (["--amp", "maybe"], "'amp' expects bool"),
    (["stray"], "unexpected argument"),
])
def test_bad_overrides_are_one_line_errors(args, message):
    with pytest.raises(RaftError, match=message) as info:
        parse_args(["--config", str(ROOT / "configs/dtd.yaml"), *args], "t")
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: dtd\n  data_path: [\n")
    with pytest.raises(RaftError, match="not valid YAML"):
        build_config(bad, {})
    bad.write_text("dataset: dtd\ndata_path: x\ntrain_epochs: 3\n")
    with pytest.raises(RaftError, match="did you mean 'train_epoch'"):
        build_config(bad, {})
    with pytest.raises(RaftError, match="not found"):
        build_config(tmp_path / "missing.yaml", {})


def test_yaml_reads_1e_minus_4_as_a_number(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: dtd\ndata_path: x\nlr: 1e-4\n")   # PyYAML parses this as a string
    assert build_config(f, {}).lr == 1e-4
