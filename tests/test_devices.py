"""Devices: what a run on a machine with or without CUDA meets."""
import pytest
import torch

from utils import RaftError


# --------------------------------------------------------------------------- devices and mixed precision
def test_cuda_device_index_is_checked_and_made_current(monkeypatch):
    from utils import resolve_device
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(i))
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [1]
    with pytest.raises(RaftError, match=r"device 'cuda:7' does not exist: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:7")
    with pytest.raises(RaftError, match="is not a device name"):
        resolve_device("gpu0")


# --------------------------------------------------------------------------- what the first GPU user meets
def test_the_first_gpu_users_messages_are_one_line_each(monkeypatch):
    """Checked with CUDA faked where that is honest: these check the messages, never a CUDA path."""
    import utils
    from utils import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RaftError, match=r"^device 'cuda' requested but CUDA is not available \(use --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", None)                 # a CPU build of torch ...
    monkeypatch.setattr(utils, "nvidia_driver_present", lambda: True)  # ... on a machine with an NVIDIA driver
    with pytest.raises(RaftError, match=r"has an NVIDIA driver but torch .* is a CPU build; install a CUDA build"):
        resolve_device("cuda:0")
    monkeypatch.setattr(utils, "nvidia_driver_present", lambda: False)
    with pytest.raises(RaftError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.slow
@pytest.mark.parametrize("phase, key", [("train_or_load", "batch_size"), ("measure_baselines", "eval_batch_size")])
def test_running_out_of_gpu_memory_names_the_batch_size_to_lower_and_loses_nothing(dtd, tmp_path, capsys,
                                                                                   monkeypatch, phase, key):
    import json
    import run.engine as engine
    from conftest import args_for, cli, run_dir
    real = getattr(engine, phase)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)")
    monkeypatch.setattr(engine, phase, exhausted)
    code, _, err = cli(args_for(dtd, tmp_path, "--train_epoch", "2"), capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert f"in {phase} (CUDA out of memory. Tried to allocate 2.00 GiB" in lines[0]
    assert f"ran at {key} " in lines[0] and f"lower it (--{key} " in lines[0] and "run the same command" in lines[0]
    monkeypatch.setattr(engine, phase, real)                         # memory freed: the same command goes on
    code, _, err = cli(args_for(dtd, tmp_path, "--train_epoch", "2"), capsys)
    assert code == 0, err
    assert json.loads((run_dir(tmp_path) / "results.json").read_text())["test_acc"] >= 0


def test_bfloat16_is_an_option_keyed_in_the_caches(capsys):
    import utils
    from conftest import ROOT, cli, one_line_error
    code, _, err = cli(["--config", str(ROOT / "configs/dtd.yaml"), "--amp_dtype", "bf16"], capsys)
    one_line_error(code, err, "amp_dtype", "did you mean 'bfloat16'")
    cuda = torch.device("cuda", 0)
    for name in ("float16", "bfloat16"):
        utils.set_amp_dtype(name)
        assert utils.amp_identity(cuda, True) == name and utils.amp_identity(torch.device("cpu"), True) is False
        assert utils.amp_identity(cuda, False) is False
    utils.set_amp_dtype("float16")
    with pytest.raises(RaftError, match="amp_dtype must be one of float16, bfloat16"):
        utils.set_amp_dtype("fp8")


@pytest.mark.slow
def test_the_cuda_tier_collects_a_test_per_cuda_branch_and_skips_here_with_its_reason():
    import re
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "tests/test_cuda.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    tier = (ROOT / "tests" / "test_cuda.py").read_text()
    listed = set(re.findall(r"\| (test_\w+) \|", tier))      # the docstring's table: branch -> test
    defined = set(re.findall(r"^def (test_\w+)", tier, re.M))
    assert listed == defined and len(defined) >= 10
    if not torch.cuda.is_available():
        assert proc.returncode == 0 and f"{len(defined)} skipped" in proc.stdout, proc.stdout[-2000:]
        assert "no CUDA device here" in proc.stdout
