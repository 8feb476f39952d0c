"""The repository's shape: the design card's top level, imports one way (no circle, no upward edge),
one place for each kind of change (a method is one file and one registry line; a loss term is
one entry in clip/loss.py), and the training loop on one screen."""
import ast
import inspect
import json
import subprocess
import sys

import pytest

from conftest import ROOT

CARD = {"README.md", "requirements.txt", "configs", "scripts", "datasets", "clip", "gpt3_file", "main.py",
        "main_imagenet.py", "utils.py", "doc"}
ALSO = {"tests", "bench", ".ci", "pytest.ini", "requirements-dev.txt", ".gitignore", "LICENSE", "CITATION.cff",
        "requirements-optional.txt"}
PACKAGES = {"run", "baselines"}   # the packages the code needs besides clip/ and datasets/
# which top-level parts each part may import: nothing upward (clip is the bottom, scripts the top)
MAY_IMPORT = {"utils": set(), "clip": {"utils", "clip"}, "datasets": {"utils", "clip", "datasets"},
              "baselines": {"utils", "baselines"}, "run": {"utils", "clip", "datasets", "baselines", "run"},
              "main": {"utils", "run", "datasets"}, "main_imagenet": {"utils", "run", "datasets"},
              "scripts": {"utils", "clip", "datasets", "baselines", "run", "scripts"},
              "gpt3_file": {"utils", "clip", "datasets", "run", "gpt3_file"}}


def tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_the_top_level_is_the_design_cards():
    entries = {path.split("/")[0] for path in tracked()}
    assert entries <= CARD | ALSO | PACKAGES, sorted(entries - CARD - ALSO - PACKAGES)
    assert {e for e in entries if e.endswith(".py")} == {"main.py", "main_imagenet.py", "utils.py"}


def module_of(path: str) -> str:
    parts = path[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: str) -> set[str]:
    """The project modules a file imports (at any depth: lazy imports inside functions count)."""
    tree = ast.parse((ROOT / path).read_text())
    package = module_of(path) if path.endswith("__init__.py") else module_of(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in MAY_IMPORT}
    return out


def graph() -> dict[str, set[str]]:
    files = [p for p in tracked() if p.endswith(".py") and p.split("/")[0] in MAY_IMPORT]
    modules = {module_of(p): p for p in files}
    return {m: {i for i in project_imports(p) if i in modules and i != m} for m, p in modules.items()}


def test_imports_run_one_way_without_circles():
    edges = graph()
    upward = [(m, i) for m, targets in edges.items() for i in targets
              if i.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert not upward, upward
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:   # depth first: a module met again on its own path is a circle
        state[m] = 1
        for i in sorted(edges[m]):
            if state.get(i) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(i):] + [i])}")
            if i not in state:
                visit(i, path + [i])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_summarize_reads_json_without_the_model_library(tmp_path):
    """summarize.py averages JSON numbers: a summary made in a fresh process loads neither open_clip
    nor this project's model code."""
    folder = tmp_path / "out" / "dtd" / "RN50_16shots_seed1"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"dataset": "dtd", "backbone": "RN50", "shots": 16, "seed": 1,
                                                     "test_acc": 60.0, "zero_shot_acc": 40.0, "alpha": 0.5}))
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from scripts import summarize; "
             f"code = summarize.main([{str(tmp_path / 'out')!r}, '--no-plot']); "
             f"print([m for m in sys.modules if m.split('.')[0] in ('open_clip', 'timm', 'clip')])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_training_loop_fits_on_one_screen():
    from run.training import train_pool
    assert len(inspect.getsource(train_pool).splitlines()) <= 70


@pytest.mark.slow
def test_a_method_is_one_file_and_one_registry_line(dtd, tmp_path, capsys, monkeypatch):
    """A throw-away method registered in one place: the config knows it, the run measures it, and
    summarize shows it under its label -- or, without one, under its key (never dropped)."""
    import baselines
    from baselines.zero_shot import ZeroShot
    from conftest import args_for, cli

    class Doubled(ZeroShot):
        name, label = "doubled", "twice zero-shot"

        def logits(self, data, features):
            return 2 * super().logits(data, features)

    class Unlabelled(Doubled):
        name, label = "unlabelled", ""

    for method in (Doubled, Unlabelled):
        monkeypatch.setitem(baselines.METHODS, method.name, method)
    assert cli(args_for(dtd, tmp_path, "--baselines", "[zero_shot, doubled, unlabelled]"), capsys)[0] == 0
    results = json.loads((tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1" / "results.json").read_text())
    assert results["baselines"]["doubled"]["test_acc"] == results["baselines"]["zero_shot"]["test_acc"]
    code, out, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    header = next(line for line in out.splitlines() if line.startswith("| dataset | shots |"))
    assert code == 0 and "twice zero-shot" in header and "| unlabelled |" in header + "|"
    monkeypatch.delitem(baselines.METHODS, "unlabelled")    # a results file's method this version does not know
    code, out, _ = cli([str(tmp_path / "out"), "--no-plot"], capsys, entry="scripts.summarize")
    assert code == 0 and "unlabelled" in next(line for line in out.splitlines() if line.startswith("| dataset"))


@pytest.mark.slow
def test_a_loss_term_is_one_entry_in_clip_loss(dtd, tmp_path, capsys, monkeypatch):
    """A throw-away term added to clip/loss.py's TERMS alone is summed, tallied, logged, and written
    to history.csv and results.json's history."""
    from clip import loss
    from conftest import args_for, cli
    monkeypatch.setitem(loss.TERMS, "extra", lambda x: 0.25 * x.cosine.new_ones(()) * x.labels.shape[0] / x.total)
    code, out, err = cli(args_for(dtd, tmp_path, "--baselines", "[]"), capsys)
    assert code == 0, err
    run = tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1"
    header, *rows = (run / "history.csv").read_text().splitlines()
    assert header.split(",")[:7] == ["epoch", "loss", "cls", "bg", "l1", "sep", "extra"]
    assert all(float(row.split(",")[6]) == pytest.approx(0.25) for row in rows)
    history = json.loads((run / "results.json").read_text())["history"]
    assert all(r["loss"] == pytest.approx(r["cls"] + r["bg"] + r["l1"] + r["sep"] + r["extra"], rel=1e-5)
               for r in history)
    assert "extra 0.250" in (run / "log.txt").read_text()
