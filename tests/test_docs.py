"""The docs stay true: example blocks exist, messages quoted are what the code prints."""
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
