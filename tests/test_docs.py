"""The docs stay true: example blocks exist, messages quoted are what the code prints."""
import pytest
from conftest import ROOT


def test_example_blocks_exist_for_the_regeneration_script():
    script = (ROOT / "doc" / "examples" / "regenerate.py").read_text()
    import re
    for doc, name in re.findall(r'ROOT / "([^"]+\.md)", "([\w-]+)"', script):
        assert f"<!-- example:{name} -->" in (ROOT / doc).read_text(), (doc, name)


def test_the_readmes_layout_is_the_trees():
    """README.md's Layout lists every module with its docstring's first sentence, as
    ``python doc/examples/regenerate.py --layout`` writes it from the tree."""
    import re
    import sys
    sys.path.insert(0, str(ROOT / "doc" / "examples"))
    import regenerate
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example:layout -->\n(.*?)<!-- /example -->", readme, re.S).group(1).rstrip("\n")
    assert block == regenerate.layout_block()


def test_what_datasets_md_says_a_folder_must_hold_is_what_the_reader_reads():
    """Each CoOp dataset's row names its image folder (or, for a root of several, the folders its
    real split file points into) and its split file, nothing the reader never opens."""
    import json
    import re
    from conftest import shared_fixture
    from datasets.coop import LAYOUTS
    splits = shared_fixture("coop_splits")
    text = (ROOT / "doc" / "datasets.md").read_text()
    for name, layout in LAYOUTS.items():
        row = re.search(rf"^\| {name} \| (.+?) \| \d+ \|", text, re.M)
        if layout.reader != "json" or row is None:
            continue
        named = set(re.findall(r"`([^`]+)`", row.group(1)))
        if layout.image_dir:
            folders = {layout.image_dir + "/"}
        else:   # the root itself: the folders the split file's paths start with
            split = json.loads((splits / layout.split_file).read_text())
            folders = {entry[0].split("/")[0] + "/" for part in split.values() for entry in part}
        assert named == folders | {layout.split_file}, (name, named)


# what the docs quote, printed by the code now: each case is run and its one line looked up in the doc
QUOTED = [
    ("robustness.md", ["--config", "configs/dtd.yaml", "--backbone", "RN42"]),
    ("weights.md", ["--config", "configs/dtd.yaml", "--backbone", "ViT-B-16-SigLP2"]),
]


@pytest.mark.parametrize("doc, argv", QUOTED, ids=[" ".join(a[2:]) for _, a in QUOTED])
def test_the_messages_the_docs_quote_are_what_the_code_prints(doc, argv, capsys):
    from conftest import cli
    code, _, err = cli([str(ROOT / a) if a.startswith("configs/") else a for a in argv], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: ")
    assert line in (ROOT / "doc" / doc).read_text(), line


@pytest.mark.slow
def test_the_readmes_demo_lands_in_the_range_the_readme_states(tmp_path):
    """The README's quick start, as a user runs it, from a fresh folder: RAFT's accuracy is within
    the range the README states for any CPU (73.44 % measured here, 74.48 % reported on another),
    its last line of the form quoted there."""
    import re
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/demo.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"demo tiny-rn 16-shot seed 1: zero-shot 12\.50% -> RAFT (\d+\.\d\d)% \(alpha \S+ from val\); "
                         r"results in output/demo/tiny-rn_16shots_seed1/results\.json", last)
    assert found, last
    assert 70.0 <= float(found.group(1)) <= 78.0
    assert "between 70 % and 78 %" in (ROOT / "README.md").read_text()
    assert "generating the demo dataset" in proc.stderr + proc.stdout
