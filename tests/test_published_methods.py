"""Each comparison method against its published code's own outputs on identical inputs
(fixtures made by bench/published_methods.py, which runs the published functions at the
commits each fixture records; doc/baselines.md gives the differences measured here)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baselines import METHODS, BaselineData
from utils import torch_load

FIXTURES = Path(__file__).parent / "fixtures" / "published"


def fixture(name: str) -> dict:
    return torch_load(FIXTURES / f"{name}.pt")["outputs"]


def ground(task: dict, view_set: str = "tip", **extra) -> BaselineData:
    raw = task["raw_views"]
    return BaselineData(task["text"], None, task["train_labels"], F.normalize(raw, dim=-1) if view_set == "tip" else None,
                        task["val"], task["val_labels"], extra.pop("scale", 100.0), task["seed"], raw={view_set: raw},
                        shots=task["shots"], **extra)


def fitted(name: str, data: BaselineData):
    method = METHODS[name]()
    with torch.no_grad():
        method.fit(data)
        chosen = method.choose(data)
    return method, chosen


def close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    ours, theirs = ours.double(), theirs.double()
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, rtol=rtol, atol=atol), f"max difference {err:.3g}"


def same_predictions(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_every_fixture_names_the_published_commit_it_was_made_at():
    for path in sorted(FIXTURES.glob("*.pt")):
        record = torch_load(path)
        assert all("@" in source and len(source.split("@")[1]) == 40 for source in record["published"].values()), path
    assert {p.stem for p in FIXTURES.glob("*.pt")} == {"tip_adapter", "gda", "lp_plus_plus", "ape", "clap", "task_res",
                                                      "clip_adapter", "prolip", "coop"}


def test_tip_adapter_and_its_f_variant_match_the_published_code():
    out = fixture("tip_adapter")
    data = ground(out["task"], dataset=out["dataset"])
    tip, chosen = fitted("tip_adapter", data)
    close(tip.keys, out["keys"], atol=1e-6)
    assert (chosen["a"], chosen["b"]) == (out["tip"]["a"], out["tip"]["b"])
    close(tip.logits(data, out["task"]["test"]), out["tip"]["test_logits"], atol=1e-4)
    tip_f, chosen = fitted("tip_adapter_f", data)
    assert chosen["epoch"] == out["tip_f"]["epoch"]
    close(tip_f.keys, out["tip_f"]["keys"], atol=1e-5)
    assert (chosen["a"], chosen["b"]) == (out["tip_f"]["a"], out["tip_f"]["b"])


def test_gda_matches_the_published_code():
    """Ours estimates in float64, the published code (its logits cast to float32) in float32."""
    out = fixture("gda")
    data = ground(out["task"])
    gda, chosen = fitted("gda", data)
    close(gda.w, out["W"], rtol=1e-3, atol=1e-3)
    close(gda.b, out["b"], rtol=1e-3, atol=1e-3)
    assert chosen["alpha"] == out["alpha"]
    close(gda.logits(data, out["task"]["test"]), out["test_logits"], rtol=1e-4, atol=1e-3)
    same_predictions(gda.logits(data, out["task"]["test"]), out["test_logits"])


def test_lp_plus_plus_matches_the_published_code():
    out = fixture("lp_plus_plus")
    data = ground(out["task"])
    lp, chosen = fitted("lp_plus_plus", data)
    assert chosen["epoch"] == out["epoch"]
    close(lp.logits(data, out["task"]["test"]), out["test_logits"], rtol=1e-4, atol=1e-4)


@pytest.fixture
def ape_fixture(monkeypatch):
    import baselines.ape as ape
    out = fixture("ape")
    s = out["settings"]
    row = ape.APESettings(tuple(s["search_scale"]), tuple(s["search_step"]),
                          (s["init_beta"], s["init_alpha"], s["init_gamma"]), s["eps"], s["training_feat_num"],
                          s["training_free_feat_num"], tuple(s["w_training_free"]), tuple(s["w_training"]), s["lr"],
                          s["train_epoch"])
    monkeypatch.setitem(ape.SETTINGS, "fixture", row)
    return out, ground(out["task"], dataset="fixture")


def test_ape_matches_the_published_code(ape_fixture):
    out, data = ape_fixture
    method, chosen = fitted("ape", data)
    assert sorted(method.channels.tolist()) == sorted(out["ape"]["channels"].tolist())
    assert (chosen["beta"], chosen["alpha"], chosen["gamma"]) == (out["ape"]["beta"], out["ape"]["alpha"],
                                                                  out["ape"]["gamma"])
    close(method.logits(data, out["task"]["test"]), out["ape"]["test_logits"], atol=1e-4)


def test_ape_t_matches_the_published_code(ape_fixture):
    out, data = ape_fixture
    method, chosen = fitted("ape_t", data)
    assert chosen["epoch"] == out["ape_t"]["epoch"]
    res, _ = method.trained
    close(res, out["ape_t"]["res"], atol=1e-5)
    assert (chosen["beta"], chosen["alpha"]) == (out["ape_t"]["beta"], out["ape_t"]["alpha"])
    close(method.logits(data, out["task"]["test"]), out["ape_t"]["test_logits"], atol=1e-3)


def test_clap_matches_the_published_code():
    out = fixture("clap")
    data = ground(out["task"], "dassl", scale=out["scale"])
    clap, _ = fitted("clap", data)
    close(clap.multipliers, out["multipliers"], atol=1e-6)
    close(clap.prototypes, out["prototypes"], atol=1e-5)
    close(clap.logits(data, out["task"]["test"]), out["test_logits"], atol=1e-3)


def test_task_res_matches_the_published_code():
    out = fixture("task_res")
    data = ground(out["task"], "dassl", scale=out["scale"])
    method, chosen = fitted("task_res", data)
    assert (chosen["alpha"], chosen["epochs"]) == (out["alpha"], out["epochs"])
    close(method.classifier, (out["task"]["text"].T + out["alpha"] * out["residual"]).T, atol=1e-5)
    close(method.logits(data, out["task"]["test"]), out["test_logits"], atol=1e-3)


def test_clip_adapter_matches_the_published_code():
    out = fixture("clip_adapter")
    data = ground(out["task"], "dassl", scale=out["scale"])
    method, _ = fitted("clip_adapter", data)
    ours = method.mlp.state_dict()
    for key, theirs in out["adapter"].items():
        close(ours[key.removeprefix("fc.")], theirs, atol=1e-5)
    close(method.logits(data, out["task"]["test"]), out["test_logits"], atol=1e-3)


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_prolip_matches_the_published_code(family):
    out = fixture("prolip")[family]
    task = out["task"]
    data = BaselineData(task["text"], None, task["train_labels"], None, None, None, 100.0, task["seed"],
                        shots=task["shots"], pre={"views": out["pre_views"], "weight": out["weight"],
                                                  "bias": out["bias"], "test_acc": out["pre_test"]})
    method, _ = fitted("prolip", data)
    close(method.weight, out["trained"], atol=1e-6)
    close(method.score(data, "test_acc", task["test"]), out["test_logits"], atol=1e-4)


@pytest.fixture(scope="module")
def coop_model():
    import open_clip
    from clip.weights import load_open_clip
    open_clip.add_model_config(FIXTURES / "coop-model.json")
    model = load_open_clip("coop-model", None)
    # as the fixture's: OpenAI's build_model rounds the weights to float16 (its convert_weights)
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return model


@pytest.mark.parametrize("variant", ["end", "middle_csc", "init_front"])
def test_coop_matches_the_published_code_step_by_step(coop_model, variant):
    """CoOp's prompts, text features, 20 SGD steps (loss at each, the context after 1, 5 and 20)
    and learning rates against its published PromptLearner / TextEncoder / trainer."""
    from types import SimpleNamespace
    from clip.prompts import PromptLearner, encode_prompts
    from clip.weights import tokenizer_for
    from run.methods import CoOpLearner
    out = fixture("coop")
    run, inputs = out[variant], out["inputs"]
    o = run["options"]
    torch.manual_seed(run["seed"])
    prompts = PromptLearner(coop_model, tokenizer_for("coop-model", None), out["classes"], o["N_CTX"], o["CTX_INIT"],
                            o["CSC"], o["CLASS_TOKEN_POSITION"])
    assert torch.equal(prompts.tokens, run["tokens"])
    close(prompts.ctx, run["initial"], atol=0)
    steps = len(run["losses"])
    cfg = SimpleNamespace(logit_scale=run["scale"], lr=0.002, train_epoch=steps)
    learner = CoOpLearner(prompts, SimpleNamespace(clip=SimpleNamespace(model=coop_model)), cfg, torch.device("cpu"),
                          False, None)
    rates = learner.rates(steps, 1, cfg)
    close(torch.tensor(rates), torch.tensor(run["lrs"]), atol=1e-15)
    for step in range(steps):
        for group in learner.optimizer.param_groups:
            group["lr"] = rates[step]
        loss, _, _ = learner.loss(None, inputs["features"][step], inputs["labels"][step], len(inputs["labels"][step]))
        assert abs(loss.item() - run["losses"][step]) < 1e-5, step
        learner.optimizer.zero_grad()
        loss.backward()
        learner.optimizer.step()
        if step + 1 in run["ctx"]:
            close(prompts.ctx, run["ctx"][step + 1], atol=1e-6)
    with torch.no_grad():   # the trained prompts' text features
        close(encode_prompts(coop_model, prompts(), prompts.tokens), run["text"], atol=1e-5)


def test_coops_learning_rate_is_dassls_at_every_step():
    from types import SimpleNamespace
    from run.methods import CoOpLearner
    schedule = fixture("coop")["schedule"]
    cfg = SimpleNamespace(lr=0.002, train_epoch=schedule["epochs"])
    ours = CoOpLearner.rates(None, len(schedule["rates"]), schedule["per_epoch"], cfg)
    close(torch.tensor(ours), torch.tensor(schedule["rates"]), atol=1e-15)
