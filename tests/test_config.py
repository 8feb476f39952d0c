"""Layered config: schema <- YAML <- command line; clear one-line errors; the shipped configs."""
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, args_for, cli, one_line_error, trained_nothing
from run.config import SCHEMA, build_config, parse_args
from utils import RaftError

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
    (["--min_lr", "1e-3", "--lr", "1e-4"], ["min_lr (0.001", "--min_lr", "larger than lr (0.0001", "--lr"]),
    (["--lambda1", "-0.1"], ["'lambda1' must be >= 0"]),
    (["--lambda2", "-1"], ["'lambda2' must be >= 0"]),
    (["--dist_timeout", "1e30"], ["'dist_timeout' must be > 0 and <= 604800"]),
    (["--batch_size_by_shots", "{1: 0}"], ["'batch_size_by_shots'", "must map shot counts", "{1: 0}"]),
    (["--batch_size_by_shots", "{1: 64, 1: 32}"], ["key '1' is given twice"]),
    (["--split_fractions", "[.nan, 0.5, 0.5]"], ["'split_fractions'", "summing to 1", "nan"]),
])
def test_every_number_in_a_config_has_a_range(args, fragments, capsys):
    one_line_error(*cli(["--config", str(ROOT / "configs/dtd.yaml"), *args], capsys)[::2], *fragments)


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


@pytest.mark.parametrize("content,fragments", [
    ("dataset: dtd\n  data_path: [oops\n", ["not valid YAML"]),
    ("dataset: dtd\ndata_path: x\nlearning_rate: 0.1\n", ["unknown config key 'learning_rate'", "did you mean"]),
    ("dataset: dtd\ndata_path: x\nbatch_size: many\n", ["'batch_size' expects int"]),
    ("dataset: dtd\ndata_path: x\nshots: 0\n", ["'shots' must be > 0"]),
    ("dataset: dtd\ndata_path: x\nlr: -0.1\n", ["'lr' must be > 0"]),
    ("dataset: dtd\ndata_path: x\nsearch_low: 1\nsearch_high: 0\n", ["empty alpha search range"]),
    ("dataset: dtd\ndata_path: x\nbad_images: ignore\n", ["'bad_images' must be 'fail' or 'skip'"]),
])
def test_bad_config_files(tmp_path, capsys, content, fragments):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    one_line_error(*cli(["--config", str(cfg)], capsys)[::2], *fragments)


# --------------------------------------------------------------------------- YAML the safe loader accepts but a run cannot use
@pytest.mark.parametrize("text,fragment", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
     for p, c in zip("abcdefgh", "bcdefghi")) + "templates: *i\n", "expands to more than"),   # billion laughs
    ("shift_sets: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    ("shift_sets: &s {a: *s}\n", "contains itself"),
    ("templates: &t [*t]\n", "contains itself"),
    ("batch_size_by_shots: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "nested too deeply"),
])
def test_yaml_that_cannot_be_a_config_is_refused_when_read(tmp_path, text, fragment):
    path = tmp_path / "bomb.yaml"
    path.write_text("dataset: dtd\ndata_path: x\n" + text)
    with pytest.raises(RaftError, match=fragment) as info:
        build_config(path, {})
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_merge_key_and_a_config_from_a_pipe_are_read(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("dataset: dtd\ndata_path: x\n<<: {lr: 2.0e-4, shots: 4}\nshots: 8\n")
    cfg = build_config(path, {})
    assert (cfg.lr, cfg.shots) == (2e-4, 8)                   # merged, and the explicit key wins
    import subprocess
    import sys
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from run.config import parse_args; "
             f"cfg, _ = parse_args(['--config', sys.argv[1]], ''); print(cfg.shots, cfg.lr)")
    done = subprocess.run(["bash", "-c", f'{sys.executable} -c "{probe}" <(printf "dataset: dtd\\ndata_path: x\\n'
                                         f'shots: 2\\n")'], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["2", "0.0001"], done.stderr


@pytest.mark.parametrize("key,written,meant", [
    ("name", "no", "no"), ("name", "010", "010"), ("name", "off", "off"), ("name", "1e3", "1e3"),
    ("name", "0x10", "0x10"), ("output_dir", "12:30:00", "12:30:00"), ("data_path", "0755", "0755"),
    ("device", "yes", "yes"), ("bad_images", "skip", "skip")])
def test_text_keys_take_the_text_as_written_in_files_and_on_the_command_line(tmp_path, key, written, meant):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: dtd\n" + ("data_path: x\n" if key != "data_path" else "") + f"{key}: {written}\n")
    if key == "device":
        with pytest.raises(RaftError):   # read as 'yes', then refused as a device name only when it is used
            from utils import resolve_device
            resolve_device(build_config(path, {}, resolve_model=False)[key])
        return
    assert build_config(path, {})[key] == meant
    cfg, _ = parse_args(["--config", str(ROOT / "configs/dtd.yaml"), f"--{key}", written], "t")
    assert cfg[key] == meant


def test_names_in_lists_stay_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: dtd\ndata_path: x\ntemplates:\n  - a photo of a {}.\n  - no {} here\n"
                    "shift_sets: {no: data/010, 'yes': 0x10}\n")
    cfg = build_config(path, {})
    assert cfg.templates == ["a photo of a {}.", "no {} here"] and cfg.shift_sets == {"no": "data/010", "yes": "0x10"}


@pytest.mark.parametrize("template", ["{0}", "a {name}.", "{:>300000000}", "{{}}", "{} and {}", "no field", "{"])
def test_a_template_holds_exactly_one_plain_field(template):
    with pytest.raises(RaftError, match="templates"):
        build_config(None, {"dataset": "dtd", "data_path": "x", "templates": [template]})


@pytest.mark.parametrize("key", ["data_path", "output_dir", "cache_dir", "descriptions"])
def test_a_nul_byte_in_a_path_is_one_line(key):
    with pytest.raises(RaftError, match=f"'{key}' holds a NUL byte"):
        parse_args(["--config", str(ROOT / "configs/dtd.yaml"), f"--{key}", "out\x00put"], "t")


@pytest.mark.parametrize("key", ["data_path", "output_dir", "cache_dir", "descriptions"])
def test_a_tilde_is_the_home_folder(key, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, _ = parse_args(["--config", str(ROOT / "configs/dtd.yaml"), f"--{key}", "~/runs"], "t")
    assert cfg[key] == str(tmp_path / "runs")
    path = tmp_path / "c.yaml"
    path.write_text("dataset: dtd\n" + ("data_path: x\n" if key != "data_path" else "")
                    + f"{key}: ~/elsewhere\nshift_sets: {{imagenet_v2: ~/v2}}\n")
    cfg = build_config(path, {})
    assert cfg[key] == str(tmp_path / "elsewhere") and cfg.shift_sets["imagenet_v2"] == str(tmp_path / "v2")


@pytest.mark.parametrize("args,fragments", [
    (["--lr", "fast"], ["'lr'", "expects float", "--lr"]),
    (["--batch_size_by_shots", "[1, 2]"], ["'batch_size_by_shots'", "expects dict", "--batch_size_by_shots"]),
    (["--warmup_epoch", "60"], ["warmup_epoch (60, --warmup_epoch)", "train_epoch (50, config file"]),
    (["--search_low", "0.9", "--search_high", "0.1"], ["search_low=0.9 (--search_low)", "search_high=0.1 (--search_high)"]),
    (["--templates", "[a photo]"], ["'templates' (--templates)", "one plain '{}'"]),
    (["--shift_sets", "[a]"], ["'shift_sets'", "expects dict"]),
    (["--baselines", "five"], ["'baselines' (--baselines)", "'all' or a list"]),
])
def test_every_config_error_names_the_key_where_it_came_from_and_what_is_accepted(args, fragments):
    with pytest.raises(RaftError) as info:
        parse_args(["--config", str(ROOT / "configs/dtd.yaml"), *args], "t")
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_a_config_error_is_reported_before_the_model_library_loads():
    import subprocess
    import sys
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import main; from utils import run_main; "
             f"code = run_main(main.main, ['--config', 'configs/dtd.yaml', '--lamda2', '1']); "
             f"print(code, [m for m in ('torch', 'open_clip', 'timm', 'torchvision') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.split("\n")[-2] == "2 []" and "did you mean 'lambda2'" in done.stderr
