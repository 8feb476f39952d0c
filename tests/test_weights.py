"""Backbone weights: tags, hub repositories and files, offline, never running code."""
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, args_for, cli, one_line_error
from utils import RaftError


# --------------------------------------------------------------------------- offline weights
@pytest.fixture()
def silent_hub():
    """A loopback 'hub' that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.slow
def test_openai_weights_offline_fail_fast_in_one_line(tmp_path, demo_root):
    """No hub (a refused connection): one line on stderr, none of the libraries' log lines."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"),
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("HF_HUB_OFFLINE", None)
    argv = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/demo.yaml"), "--data_path",
            str(demo_root), "--num_classes", "4", "--backbone", "RN50", "--weights", "openai",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download OpenAI's RN50 weights"), proc.stderr
    assert "cannot be reached" in lines[0] and lines[0].endswith("(doc/weights.md)")


@pytest.mark.slow
def test_an_unanswering_hub_times_out_in_seconds(silent_hub, tmp_path, monkeypatch):
    from clip import weights as backbone
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone, "HUB_TIMEOUT", 1.0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(backbone, "cached_tag_file", lambda name, tag: None)   # not cached
    start = time.perf_counter()
    with pytest.raises(RaftError, match="cannot be reached"):
        backbone.load_open_clip("RN50", "openai")
    assert time.perf_counter() - start < 10
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RaftError, match="HF_HUB_OFFLINE is set"):
        backbone.load_open_clip("RN50", "openai")


def test_cached_openai_weights_are_found_without_the_network(tmp_path, monkeypatch):
    from clip import weights as backbone
    cached = tmp_path / "xdg" / "clip" / "RN50.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backbone.openai_weights_file("RN50") == cached                 # the clip package's download
    hub = tmp_path / "hf" / "hub" / "models--timm--resnet101_clip.openai"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc")
    (hub / "snapshots" / "abc").mkdir(parents=True)
    (hub / "snapshots" / "abc" / "open_clip_model.safetensors").write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    found = backbone.openai_weights_file("RN101")
    assert found is not None and found.name == "open_clip_model.safetensors"


@pytest.mark.slow
def test_a_foreign_state_dict_names_the_mismatch(tmp_path, tiny_clip):
    from clip.backbone import load_open_clip
    path = tmp_path / "tiny_state.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    with pytest.raises(RaftError, match=r"does not hold RN50 weights: .*shape mismatches \(first: "):
        load_open_clip("RN50", str(path))


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


def test_bad_backbone_and_weights(dtd, tmp_path, capsys):
    one_line_error(*cli(args_for(dtd, tmp_path, "--backbone", "RN42"), capsys)[::2], "unknown backbone 'RN42'",
                   "(did you mean ", "RN50")
    one_line_error(*cli(args_for(dtd, tmp_path, "--backbone", "RN50", "--weights", str(tmp_path / "no.pt")),
                        capsys)[::2], "weights file not found")
