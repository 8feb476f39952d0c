"""Class sentences (descriptions vs templates) and the cached text classifier (doc/method.md §3)."""
import json

import pytest
import torch

from clip.text import cached_text_matrix, class_sentences, load_descriptions, lookup_description, text_matrix
from conftest import args_for, cli, one_line_error, shared_fixture
from utils import RaftError


@pytest.fixture(autouse=True)
def raft_log_to_caplog(monkeypatch):
    """The project's logger does not propagate (it has its own handlers); let caplog see it here."""
    import logging
    monkeypatch.setattr(logging.getLogger("raft"), "propagate", True)


def split_classnames(split_file):
    rows = json.loads(shared_fixture("coop_splits", split_file).read_text())
    names = {r[1]: r[2] for s in rows.values() for r in s}
    return [names[i] for i in range(len(names))]


@pytest.mark.parametrize("split_file,desc_file", [("split_zhou_UCF101.json", "ucf101_prompt.json"),
                                                  ("split_zhou_OxfordPets.json", "oxford_pets_prompt.json"),
                                                  ("split_zhou_Caltech101.json", "caltech101_prompt.json")])
def test_every_split_class_finds_its_descriptions(split_file, desc_file, caplog):
    classnames = split_classnames(split_file)
    descriptions = load_descriptions(shared_fixture("descriptions", desc_file))
    underscored = [c for c in classnames if "_" in c]
    assert underscored, "these splits spell some class names with underscores"
    assert all(c not in descriptions for c in underscored if c.replace("_", " ") != c)
    sentences = class_sentences(classnames, ["a photo of a {}."], descriptions)
    assert "templates" not in caplog.text
    for name, group in zip(classnames, sentences):
        assert group == [s.strip() for s in descriptions[name.replace("_", " ") if name not in descriptions
                                                         else name]]


def test_lookup_prefers_exact_key_then_spaces():
    desc = {"Apply Eye Makeup": ["spaces"], "a_b": ["exact"], "a b": ["spaced"]}
    assert lookup_description(desc, "Apply_Eye_Makeup") == ["spaces"]
    assert lookup_description(desc, "a_b") == ["exact"]
    assert lookup_description(desc, "missing") is None
    assert lookup_description({"x": []}, "x") is None


def test_missing_classes_fall_back_to_templates_with_a_warning(caplog):
    sentences = class_sentences(["Apply_Eye_Makeup", "Yo_Yo"], ["a photo of a person doing {}."],
                                {"Apply Eye Makeup": ["one.", "two."]}, "ucf.json")
    assert sentences == [["one.", "two."], ["a photo of a person doing Yo Yo."]]
    assert "Yo_Yo" in caplog.text and "templates" in caplog.text


def test_bad_description_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(RaftError, match="not valid JSON"):
        load_descriptions(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(RaftError, match="JSON object"):
        load_descriptions(bad)


def test_text_matrix_columns_and_background(tiny_clip):
    names = ["red circle", "blue_square", "green triangle"]
    sentences = [["a red circle.", "a round red thing."], ["a blue square."], ["a green triangle."]]
    T = text_matrix(tiny_clip, names, sentences)
    assert T.shape == (tiny_clip.embed_dim, 4)
    assert torch.allclose(T[:, :3].norm(dim=0), torch.ones(3), atol=1e-5)
    # class column = normalised mean of normalised sentence embeddings
    e = torch.nn.functional.normalize(tiny_clip.encode_text(sentences[0]), dim=-1).mean(0)
    assert torch.allclose(T[:, 0], e / e.norm(), atol=1e-5)
    # background = mean of normalised "the background of {c}." (underscores read as spaces), not renormalised
    bg = torch.nn.functional.normalize(tiny_clip.encode_text(
        ["the background of red circle.", "the background of blue square.", "the background of green triangle."]),
        dim=-1).mean(0)
    assert torch.allclose(T[:, 3], bg, atol=1e-5) and T[:, 3].norm() < 1 - 1e-4
    T2 = text_matrix(tiny_clip, names, sentences, renorm_bg=True)
    assert torch.allclose(T2[:, 3].norm(), torch.tensor(1.0), atol=1e-5)


def test_text_cache_is_reused_only_for_identical_inputs(tiny_clip, tmp_path, monkeypatch):
    names = ["cat", "dog"]
    sentences = [["a cat."], ["a dog."]]
    T = cached_text_matrix(tiny_clip, names, sentences, tmp_path, "toy")
    files = list((tmp_path / "text").glob("*.pt"))
    assert len(files) == 1
    calls = []
    import clip.text as text_mod
    monkeypatch.setattr(text_mod, "text_matrix", lambda *a, **k: calls.append(1) or torch.zeros(2, 3))
    assert torch.equal(cached_text_matrix(tiny_clip, names, sentences, tmp_path, "toy"), T) and not calls
    cached_text_matrix(tiny_clip, names, [["a cat."], ["a puppy."]], tmp_path, "toy")   # sentence changed
    assert calls and len(list((tmp_path / "text").glob("*.pt"))) == 2


def test_a_damaged_or_foreign_text_cache_is_rebuilt(tiny_clip, tmp_path):
    names, sentences = ["cat", "dog"], [["a cat."], ["a dog."]]
    T = cached_text_matrix(tiny_clip, names, sentences, tmp_path, "toy")
    path = next((tmp_path / "text").glob("*.pt"))
    path.write_bytes(path.read_bytes()[:100])                       # truncated
    assert torch.allclose(cached_text_matrix(tiny_clip, names, sentences, tmp_path, "toy"), T)
    torch.save({"key": "someone else's", "T": torch.zeros_like(T)}, path)  # manifest mismatch
    assert torch.allclose(cached_text_matrix(tiny_clip, names, sentences, tmp_path, "toy"), T)


def test_description_files(dtd, tmp_path, capsys):
    desc = tmp_path / "desc.json"
    desc.write_text("{not json")
    one_line_error(*cli(args_for(dtd, tmp_path, "--descriptions", str(desc)), capsys)[::2], "not valid JSON")
    desc.write_text(json.dumps({"red circle": ["a red disc.", "a round red shape."], "blue square": []}))
    code, out, err = cli(args_for(dtd, tmp_path, "--descriptions", str(desc)), capsys)
    assert code == 0, err
    assert "no usable sentences for blue square, green triangle" in out and "using templates" in out


# --------------------------------------------------------------------------- what the text window does to sentences
@pytest.mark.parametrize("names", [["Cat", "cat"], ["dog", "dog "], ["big_cat", "big cat"], ["a-b", "A-B", "x"]])
def test_classes_whose_prompts_tokenize_the_same_are_refused_naming_them(tiny_clip, names):
    from clip.text import sentence_report
    from utils import RaftError
    sentences = class_sentences(names, ["a photo of a {}."])
    with pytest.raises(RaftError, match="tokenize the same") as info:
        sentence_report(tiny_clip, names, sentences)
    assert all(repr(n) in str(info.value) for n in names[:2])


PREAMBLE = " ".join(["this is a long and detailed description of a photograph taken outdoors in daylight"] * 6)


def test_descriptions_cut_before_the_class_name_stop_the_run(tiny_clip):
    from clip.text import sentence_report
    from utils import RaftError
    names = ["red circle", "blue square"]
    cut_early = [[f"{PREAMBLE}, showing a {n}."] * 3 for n in names]      # the names lie past 77 tokens
    with pytest.raises(RaftError, match="cut at the text encoder's 77 tokens before it names the class"):
        sentence_report(tiny_clip, names, cut_early)


def test_descriptions_cut_after_the_name_are_counted(tiny_clip):
    from clip.text import sentence_report
    names = ["red circle", "blue square", "green triangle"]
    sentences = [[f"a {n}: {PREAMBLE}.", f"a photo of a {n}."] for n in names[:2]] + [["a green triangle."]]
    report = sentence_report(tiny_clip, names, sentences)
    assert report == {"context_length": 77, "cut_sentences": 2, "cut_by_class": {"red circle": 1, "blue square": 1}}


@pytest.mark.slow
def test_a_run_records_its_cut_sentences_and_refuses_colliding_classes(dtd, tmp_path, capsys):
    import json
    from conftest import args_for, cli, one_line_error, run_dir
    descriptions = tmp_path / "long.json"
    descriptions.write_text(json.dumps({n: [f"a {n}: {PREAMBLE}.", f"a {n}."]
                                        for n in ("red circle", "blue square", "green triangle")}))
    code, out, err = cli(args_for(dtd, tmp_path, "--descriptions", str(descriptions), "--baselines", "[]"), capsys)
    assert code == 0, err
    assert "3 of 6 class sentences are longer than the text encoder's 77 tokens" in out
    assert json.loads((run_dir(tmp_path) / "results.json").read_text())["text_cut"]["cut_sentences"] == 3
    same = tmp_path / "same.json"
    same.write_text(json.dumps({n: [f"{PREAMBLE} {PREAMBLE}"] for n in ("red circle", "blue square", "green triangle")}))
    code, _, err = cli(args_for(dtd, tmp_path, "--descriptions", str(same), "--output_dir", str(tmp_path / "o2")),
                       capsys)
    one_line_error(code, err, "tokenize the same", "cut at the window", "'red circle'")
