"""Run each comparison method's *published* code on seeded random features and keep what it
computes, for tests/test_published_methods.py to hold this project's implementations to.

    python bench/published_methods.py --published /path/to/checkouts [--methods gda ape ...]

``--published`` holds one checkout per repository, named as in ``REPOSITORIES`` (the commits
the fixtures were made at are recorded in each fixture and listed there). Nothing of the
published code is copied: its functions and classes are read from those files and executed
here, on the CPU, with these adapters, each stated where it is made:

* ``.cuda()`` is the identity, and ``.half()`` widens to float32 instead of narrowing (the
  published code runs CLIP in float16 on a GPU; here every method runs in float32);
* ``cls_acc``, the repositories' shared accuracy helper, reads its count with ``.item()``:
  current numpy refuses its ``float()`` of a one-element array;
* a data loader yields the images' indices and a fake CLIP's ``encode_image`` returns the
  fixture's features of those images (the view of the current pass for augmented loaders),
  in orders this script draws and stores (the published runs draw them from the global RNG);
* Dassl's trainer loops (TrainerX.run_epoch and the model bookkeeping of TrainerBase) are
  executed from Dassl's own source, the methods' trainers from theirs; only CLIP, the
  datasets and the writers are left out. Dassl's warm-up scheduler passes torch's schedulers
  a ``verbose`` argument they no longer take: it is dropped.

Each fixture (``tests/fixtures/published/<method>.pt``, a few kB) holds the inputs, the settings
and the published outputs.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import math
import os
import sys
import tempfile
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "published"

REPOSITORIES = {   # checkout folder: (GitHub repository, commit)
    "Tip-Adapter": ("gaopengcuhk/Tip-Adapter", "d0e2d6f8c5feb8b6ce937b757810761f7155d4d5"),
    "ICLR24": ("mrflogs/ICLR24", "560fe211700964c915442ff98dbe47dd09656a35"),
    "FewShot-CLIP-Strong-Baseline": ("FereshteShakeri/FewShot-CLIP-Strong-Baseline",
                                     "f81054f995b060f8348d20e7306e15889b70c786"),
    "APE": ("yangyangyang127/APE", "70460de74d1e967f8b4d270b3419373694758536"),
    "CLAP": ("jusiro/CLAP", "dbdf4095b3d824546474c725539b9f4efff3ca0e"),
    "ProLIP": ("astra-vision/ProLIP", "b43e795cbf0b53a9b0aa83cf4f47d9755896ba6f"),
    "TaskRes": ("geekyutao/TaskRes", "5195359661d6bef661090c33b81aacfc7d7cc181"),
    "CLIP-Adapter": ("gaopengcuhk/CLIP-Adapter", "08d07f8b2ecafc6f1479fe636b26d464d7a5574e"),
    "Dassl.pytorch": ("KaiyangZhou/Dassl.pytorch", "c61a1b570ac6333bd50fb5ae06aea59002fb20bb"),
    "CoOp": ("KaiyangZhou/CoOp", "ff61507c790454bce7c5052c3ac39e60772f1f89"),
}
COOP_MODEL = ROOT / "tests" / "fixtures" / "published" / "coop-model.json"   # text width 128: OpenAI's heads = width / 64


# --------------------------------------------------------------------------- reading published code
def definitions(path: Path, names: list[str], namespace: dict) -> dict:
    """Execute the named top-level functions and classes of ``path`` (nothing else of the file:
    its imports of CLIP, Dassl's registries and datasets stay out) in ``namespace``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [n for n in names if n != "cls_acc"]   # see cls_acc below
    namespace.setdefault("cls_acc", cls_acc)
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    if missing:
        raise SystemExit(f"{path}: no {', '.join(sorted(missing))} (another commit than {REPOSITORIES}?)")
    for node in nodes:
        node.decorator_list = []   # @TRAINER_REGISTRY.register(): a registry this script does not need
    namespace.setdefault("__name__", f"published_{len(sys.modules)}")
    exec(compile(ast.Module(nodes, []), str(path), "exec"), namespace)
    module = sys.modules.setdefault(namespace["__name__"], types.ModuleType(namespace["__name__"]))
    module.__dict__.update({n.name: namespace[n.name] for n in nodes})   # pickling finds its classes (APE-T)
    return namespace


def cls_acc(output, target, topk=1):
    """The published repositories' shared ``cls_acc`` (top-k accuracy in percent) as they compute
    it; their last step, ``float()`` of a one-element array, is refused by current numpy, so the
    count is read with ``.item()`` here: the same number."""
    pred = output.topk(topk, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return 100 * float(correct[: topk].reshape(-1).float().sum(0, keepdim=True).item()) / target.shape[0]


def base_namespace(**extra) -> dict:
    import datetime
    import time
    import copy
    from tqdm import tqdm
    return {"torch": torch, "nn": nn, "F": F, "np": np, "time": time, "datetime": datetime, "copy": copy,
            "tqdm": tqdm, "os": os, "osp": os.path, "Path": Path, "OrderedDict": OrderedDict, **extra}


def returning_locals(fn, *args, **kwargs):
    """``fn(*args)`` and its local variables as it returns (the published functions print their
    choices and return an accuracy: what they chose is read off their frame)."""
    captured: dict = {}
    code = fn.__code__

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            captured.update(frame.f_locals)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(previous)
    return result, captured


@contextlib.contextmanager
def on_cpu():
    """``.cuda()`` the identity, ``.half()`` widening to float32, ``torch.load`` of whole modules
    allowed (APE-T saves its adapter module and loads it back), printing silenced."""
    saved = (torch.Tensor.cuda, nn.Module.cuda, torch.Tensor.half, nn.Module.half, torch.load,
             torch.cuda.empty_cache)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.half = lambda self, *a, **k: self.float()
    nn.Module.half = lambda self, *a, **k: self.float()
    load = torch.load
    torch.load = lambda *a, **k: load(*a, **{**k, "weights_only": False})
    torch.cuda.empty_cache = lambda: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        (torch.Tensor.cuda, nn.Module.cuda, torch.Tensor.half, nn.Module.half, torch.load,
         torch.cuda.empty_cache) = saved


# --------------------------------------------------------------------------- identical inputs
def make_task(seed: int, classes: int = 5, shots: int = 4, dim: int = 24, views: int = 10, val: int = 6,
              test: int = 12) -> dict:
    """Features of a small few-shot task, class-major (image i is of class i // shots): raw view
    features of the few-shot images (norms vary, as a trunk's do), normalised val/test features,
    a weak text classifier (D×C, unit columns)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    labels = torch.arange(classes).repeat_interleave(shots)
    base = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=gen)
    raw = (base + 0.4 * torch.randn(views, len(labels), dim, generator=gen)) * \
        (1 + torch.rand(views, len(labels), 1, generator=gen))

    def split(per_class):
        y = torch.arange(classes).repeat_interleave(per_class)
        return F.normalize(centres[y] + 0.8 * torch.randn(len(y), dim, generator=gen), dim=-1), y

    val_f, val_l = split(val)
    test_f, test_l = split(test)
    text = F.normalize(centres.T + 2.0 * torch.randn(dim, classes, generator=gen), dim=0)
    return {"raw_views": raw, "train_labels": labels, "val": val_f, "val_labels": val_l, "test": test_f,
            "test_labels": test_l, "text": text, "shots": shots, "seed": seed}


class Loader:
    """A data loader over the few-shot images: batches of their indices and labels. Each
    iteration is one pass (``pass_index`` counts them); ``orders`` gives each pass's order
    (None: the images' own order)."""

    def __init__(self, labels: torch.Tensor, batch: int, orders: list[torch.Tensor] | None = None,
                 drop_last: bool = False, as_dict: bool = False):
        self.labels, self.batch_size, self.orders = labels, batch, orders
        self.drop_last, self.as_dict = drop_last, as_dict
        self.pass_index = -1

    def _batches(self, order):
        n = len(order)
        stop = n - n % self.batch_size if self.drop_last and n % self.batch_size else n
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self):
        return len(self._batches(torch.arange(len(self.labels))))

    def __iter__(self):
        self.pass_index += 1
        order = torch.arange(len(self.labels)) if self.orders is None else self.orders[self.pass_index]
        for idx in self._batches(order):
            yield {"img": idx, "label": self.labels[idx]} if self.as_dict else (idx, self.labels[idx])


class FakeCLIP(nn.Module):
    """``encode_image(indices)``: the features of those images in the loader's current pass."""

    def __init__(self, features_of_pass, loader: Loader, dtype=torch.float32):
        super().__init__()
        self.features_of_pass, self.loader, self.dtype = features_of_pass, loader, dtype

    def encode_image(self, idx):
        return self.features_of_pass(self.loader.pass_index)[idx.long()].clone()   # (cast to CLIP's dtype on the way)

    def forward(self, idx):
        return self.encode_image(idx)


def orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    from baselines.base import epoch_orders   # the orders this project draws: the same inputs for both
    return epoch_orders(n, epochs, seed)


def dassl_optim(name: str, lr: float, epochs: int, weight_decay: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(NAME=name, LR=lr, WEIGHT_DECAY=weight_decay, MOMENTUM=0.9, SGD_DAMPNING=0,
                                 SGD_NESTEROV=False, RMSPROP_ALPHA=0.99, ADAM_BETA1=0.9, ADAM_BETA2=0.999,
                                 STAGED_LR=False, NEW_LAYERS=(), BASE_LR_MULT=0.1, LR_SCHEDULER="cosine",
                                 STEPSIZE=(-1,), GAMMA=0.1, MAX_EPOCH=epochs, WARMUP_EPOCH=1,
                                 WARMUP_RECOUNT=True, WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5,
                                 WARMUP_MIN_LR=1e-5)


def dassl_trainers(published: Path) -> dict:
    """Dassl's TrainerBase, SimpleTrainer and TrainerX from its source, its meters and accuracy,
    its optimiser and scheduler builders (imported: they need torch only)."""
    dassl = published / "Dassl.pytorch"
    if str(dassl) not in sys.path:
        sys.path.insert(0, str(dassl))
    from dassl.optim import build_lr_scheduler, build_optimizer
    schedulers = torch.optim.lr_scheduler
    if "verbose" not in schedulers.LRScheduler.__init__.__code__.co_varnames:
        # Dassl's warm-up scheduler passes `verbose`, which torch's schedulers no longer take
        schedulers._LRScheduler.__init__ = (lambda self, optimizer, last_epoch=-1, verbose=False:
                                            schedulers.LRScheduler.__init__(self, optimizer, last_epoch))
    ns = base_namespace()
    definitions(dassl / "dassl/utils/meters.py", ["AverageMeter", "MetricMeter"], ns)
    definitions(dassl / "dassl/metrics/accuracy.py", ["compute_accuracy"], ns)
    definitions(dassl / "dassl/utils/tools.py", ["tolist_if_not"], ns)
    ns["defaultdict"] = __import__("collections").defaultdict
    definitions(dassl / "dassl/engine/trainer.py", ["TrainerBase", "SimpleTrainer", "TrainerX"], ns)
    ns |= {"build_optimizer": build_optimizer, "build_lr_scheduler": build_lr_scheduler,
           "TRAINER_REGISTRY": None}
    return ns


def new_trainer(cls, cfg, loader: Loader, max_epoch: int):
    """An instance of a Dassl trainer class without its __init__ (which builds datasets and CLIP)."""
    trainer = object.__new__(cls)
    trainer._models, trainer._optims, trainer._scheds, trainer._writer = OrderedDict(), OrderedDict(), OrderedDict(), None
    trainer.cfg, trainer.train_loader_x, trainer.max_epoch = cfg, loader, max_epoch
    trainer.device, trainer.start_epoch, trainer.epoch = torch.device("cpu"), 0, 0
    return trainer


def module_of(cls, **attributes):
    """An nn.Module of a published class built without its __init__ (which loads CLIP), given the
    attributes its forward reads."""
    module = object.__new__(cls)
    nn.Module.__init__(module)
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


def logit_scale() -> nn.Parameter:
    return nn.Parameter(torch.tensor(math.log(100.0)), requires_grad=False)


# --------------------------------------------------------------------------- the methods
def tip_cache(published: Path, task: dict, ns: dict | None = None):
    """Tip-Adapter's build_cache_model on the raw views: keys D×N, values N×C."""
    ns = ns or base_namespace()
    definitions(published / "Tip-Adapter/utils.py", ["build_cache_model", "cls_acc", "search_hp"], ns)
    raw = task["raw_views"]
    loader = Loader(task["train_labels"], 256)
    with tempfile.TemporaryDirectory() as tmp, on_cpu():
        cfg = {"load_cache": False, "augment_epoch": len(raw), "cache_dir": tmp, "shots": task["shots"]}
        keys, values = ns["build_cache_model"](cfg, FakeCLIP(lambda p: raw[p], loader), loader)
    return keys, values, ns


def run_tip(published: Path) -> dict:
    from baselines.tip_adapter import SETTINGS
    task = make_task(1)
    dataset = "eurosat"                  # a grid of its own (12, 10), 100 Tip-Adapter-F epochs
    s = SETTINGS[dataset]
    keys, values, ns = tip_cache(published, task)
    initial_keys = keys.T.clone()   # Tip-Adapter-F's adapter trains these very tensors in place
    definitions(published / "Tip-Adapter/main.py", ["run_tip_adapter", "run_tip_adapter_F"], ns)
    cfg = {"search_hp": True, "search_scale": [s.scale_b, s.scale_a], "search_step": [s.steps_b, s.steps_a],
           "init_beta": s.init_b, "init_alpha": s.init_a, "lr": 1e-3, "train_epoch": s.train_epoch,
           "shots": task["shots"]}
    with on_cpu():
        _, tip = returning_locals(ns["run_tip_adapter"], cfg, keys, values, task["val"], task["val_labels"],
                                  task["test"], task["test_labels"], task["text"])
    views = F.normalize(task["raw_views"], dim=-1)
    loader = Loader(task["train_labels"], 256, orders(len(task["train_labels"]), s.train_epoch, task["seed"]))
    with tempfile.TemporaryDirectory() as tmp, on_cpu():
        cfg["cache_dir"] = tmp
        # its epoch is chosen on the "test" features it is given: given the validation features,
        # it chooses on validation, as this project does
        _, tip_f = returning_locals(ns["run_tip_adapter_F"], cfg, keys, values, task["val"], task["val_labels"],
                                    task["val"], task["val_labels"], task["text"],
                                    FakeCLIP(lambda p: task["raw_views"][p % len(views)], loader), loader)
    return {"task": task, "dataset": dataset, "keys": initial_keys, "values": values,
            "tip": {"a": tip["best_alpha"], "b": tip["best_beta"], "test_logits": tip["tip_logits"]},
            "tip_f": {"keys": tip_f["adapter"].weight.detach().clone(), "a": tip_f["best_alpha"],
                      "b": tip_f["best_beta"], "epoch": tip_f["best_epoch"] + 1}}


def run_gda(published: Path) -> dict:
    task = make_task(2)
    raw = task["raw_views"]   # float32: its logits cast the features to float32 (`.float()`)
    ns = base_namespace()
    definitions(published / "ICLR24/main_few_shots.py", ["run"], ns)
    ns.update(val_features=task["val"], val_labels=task["val_labels"], test_features=task["test"],
              test_labels=task["test_labels"])
    loader = Loader(task["train_labels"], 256)
    with on_cpu():
        _, out = returning_locals(ns["run"], {"augment_epoch": len(raw)}, loader, task["text"],
                                  FakeCLIP(lambda p: raw[p], loader))
    return {"task": task, "W": out["W"], "b": out["b"], "alpha": out["best_alpha"], "test_logits": out["test_logits"]}


def run_lp_plus_plus(published: Path) -> dict:
    task = make_task(3)
    repo = published / "FewShot-CLIP-Strong-Baseline/methods"
    ns = base_namespace(Variable=torch.autograd.Variable)
    from scipy.linalg import eigh
    ns["eigh"] = eigh
    definitions(repo / "method.py", ["FSCLIPmethod"], ns)
    definitions(repo / "utils.py", ["get_one_hot", "compute_centroids", "compute_centroids_alpha"], ns)
    one_hot = ns["get_one_hot"]
    ns["get_one_hot"] = lambda y, num_classes: one_hot(y, num_classes).float()   # float16 0/1, widened
    definitions(repo / "linear_probe_p2.py", ["calculate_lr_alpha", "calculate_init_alpha", "calculate_lr_w",
                                              "LinearProbe_P2"], ns)
    first = task["raw_views"][0]
    train = Loader(task["train_labels"], 256)
    val = Loader(task["val_labels"], 256)
    model = FakeCLIP(lambda p: first, train)
    method = ns["LinearProbe_P2"]({"train_epoch": 300, "shots": task["shots"], "dataset": "x", "output_dir": "."})

    class Both(FakeCLIP):     # the train loader's features, then the val loader's
        def encode_image(self, idx):
            return (first if self.loader.pass_index == 0 and val.pass_index < 0 else task["val"])[idx].clone()

    model = Both(None, train)
    torch.manual_seed(task["seed"])            # the classifier's bias: nn.Linear's draw from this seed
    with on_cpu():
        _, out = returning_locals(method.forward, train, val, task["test"], task["test_labels"], task["text"],
                                  model, None)
    return {"task": task, "epoch": out["best_epoch"] + 1, "test_logits": out["logits_test"].detach(),
            "lr_w": float(out["lr_temp"]), "lr_alpha": float(out["self"].lr_alpha),
            "init_alpha": float(out["final_init_alpha_mean"])}


def ape_settings(feat_num: int) -> dict:
    return {"search_scale": [7, 7, 1], "search_step": [60, 10, 5], "init_beta": 1, "init_alpha": 2,
            "init_gamma": 0.1, "eps": 0.001, "training_feat_num": feat_num, "training_free_feat_num": feat_num,
            "w_training_free": [0.7, 0.3], "w_training": [0.2, 0.8], "lr": 0.001, "train_epoch": 12}


def run_ape(published: Path) -> dict:
    task = make_task(4)
    keys, values, ns = tip_cache(published, task)
    definitions(published / "APE/utils.py", ["cls_acc", "cal_criterion", "SmoothCrossEntropy", "APE_Training"], ns)
    definitions(published / "APE/main.py", ["APE", "APE_T"], ns)
    settings = ape_settings(16)
    cfg = {**settings, "shots": task["shots"], "dataset": "fixture", "backbone": "RN50"}
    views = task["raw_views"]
    loader = Loader(task["train_labels"], 256, orders(len(task["train_labels"]), settings["train_epoch"],
                                                      task["seed"]))
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, on_cpu():
        os.chdir(tmp)   # its criterion is saved to caches/<dataset>/ and read back by APE-T, as in its main
        try:
            Path("caches/fixture").mkdir(parents=True)
            cfg["cache_dir"] = "caches/fixture"
            _, ape = returning_locals(ns["APE"], dict(cfg), keys, values.float(), task["val"], task["val_labels"],
                                      task["test"], task["test_labels"], task["text"])
            cfg["feat_num"] = settings["training_feat_num"]   # read by APE_T, in no config: it fails without
            _, ape_t = returning_locals(ns["APE_T"], dict(cfg), keys, values.float(), task["val"],
                                        task["val_labels"], task["test"], task["test_labels"], task["text"],
                                        FakeCLIP(lambda p: views[p % len(views)], loader), loader)
        finally:
            os.chdir(here)
    return {"task": task, "settings": settings,
            "ape": {"beta": ape["best_beta"], "alpha": ape["best_alpha"], "gamma": ape["best_gamma"],
                    "channels": ape["indices"], "test_logits": ape["ape_logits"]},
            "ape_t": {"beta": ape_t["best_beta"], "alpha": ape_t["best_alpha"], "epoch": ape_t["best_epoch"] + 1,
                      "test_logits": ape_t["ape_logits"], "res": ape_t["adapter"].res.detach().clone()}}


def run_clap(published: Path) -> dict:
    task = make_task(5, views=20, shots=52, classes=5, dim=8)   # 260 images: more than one batch of 256
    ns = dassl_trainers(published)
    ns |= {"SimpleTrainer": ns["SimpleTrainer"]}
    definitions(published / "CLAP/trainers/adapters.py", ["AdapterMethod", "CustomCLIP", "TrainerXCostume",
                                                          "ADAPTER"], ns)
    raw = task["raw_views"]
    features = raw.reshape(-1, raw.shape[-1])
    labels = task["train_labels"].repeat(len(raw))
    adapter_cfg = types.SimpleNamespace(INIT="ZS", CONSTRAINT="l2", PREC="fp32")
    cfg = types.SimpleNamespace(TRAINER=types.SimpleNamespace(ADAPTER=adapter_cfg),
                                TRAIN=types.SimpleNamespace(PRINT_FREQ=10 ** 9), OPTIM=dassl_optim("sgd", 0.1, 300, 0.0))
    clip = types.SimpleNamespace(dtype=torch.float32, logit_scale=logit_scale())
    with on_cpu():
        adapter = ns["AdapterMethod"](cfg, clip, task["text"].T.clone())
        model = module_of(ns["CustomCLIP"], logit_scale=clip.logit_scale, dtype=torch.float32, adapter=adapter)
        trainer = new_trainer(ns["ADAPTER"], cfg, Loader(task["train_labels"], 256, drop_last=True), 300)
        trainer.model = model
        trainer.features_train, trainer.labels_train = features.clone(), labels.clone()
        trainer.features_test, trainer.labels_test = task["test"], task["test_labels"]
        with torch.no_grad():
            logits_zs = model.forward_features(features)
        adapter.init_lagrangian_multipliers(labels, logits_zs)
        optim = ns["build_optimizer"](model.adapter, cfg.OPTIM)
        trainer.register_model("adapter", model.adapter, optim, ns["build_lr_scheduler"](optim, cfg.OPTIM))
        np.random.seed(task["seed"])             # Dassl's set_random_seed
        for trainer.epoch in range(300):
            trainer.run_epoch()
        with torch.no_grad():
            test_logits = model.forward_features(task["test"])
    return {"task": task, "scale": float(clip.logit_scale.exp()), "multipliers": adapter.alpha_constraint.clone(),
            "prototypes": adapter.prototypes.detach().clone(), "test_logits": test_logits}


def run_dassl_method(published: Path, task: dict, ns: dict, trainer_cls, model, optim_cfg, batch: int,
                     epochs: int, name: str):
    """A Dassl TrainerX method trained for ``epochs`` on the task's views (epoch e: view e mod V)."""
    loader = Loader(task["train_labels"], batch, orders(len(task["train_labels"]), epochs, task["seed"]),
                    drop_last=len(task["train_labels"]) >= batch, as_dict=True)
    views = task["raw_views"]
    encoder = FakeCLIP(lambda p: views[p % len(views)], loader)
    cfg = types.SimpleNamespace(TRAIN=types.SimpleNamespace(PRINT_FREQ=10 ** 9), OPTIM=optim_cfg,
                                TRAINER=types.SimpleNamespace(TaskRes=types.SimpleNamespace(PREC="fp32")))
    model.image_encoder = encoder
    trainer = new_trainer(trainer_cls, cfg, loader, epochs)
    trainer.model = model
    learned = getattr(model, name)
    optim = ns["build_optimizer"](learned, optim_cfg)
    trainer.register_model(name, learned, optim, ns["build_lr_scheduler"](optim, optim_cfg))
    for trainer.epoch in range(epochs):
        trainer.run_epoch()
    model.image_encoder = nn.Identity()
    with torch.no_grad():
        return model(task["test"])


def run_task_res(published: Path) -> dict:
    task = make_task(6, views=20)
    ns = dassl_trainers(published)
    definitions(published / "TaskRes/trainers/taskres.py", ["TaskResLearner", "CustomCLIP", "TaskRes"], ns)
    epochs, alpha = 100, 0.5
    cfg = types.SimpleNamespace(TRAINER=types.SimpleNamespace(TaskRes=types.SimpleNamespace(RESIDUAL_SCALE=alpha)))
    clip = types.SimpleNamespace(dtype=torch.float32)
    with on_cpu():
        learner = ns["TaskResLearner"](cfg, None, clip, task["text"].T.clone())
        model = module_of(ns["CustomCLIP"], logit_scale=logit_scale(), dtype=torch.float32, prompt_learner=learner)
        test_logits = run_dassl_method(published, task, ns, ns["TaskRes"], model,
                                       dassl_optim("adam", 2e-3, epochs, 5e-4), 256, epochs, "prompt_learner")
    return {"task": task, "alpha": alpha, "epochs": epochs, "scale": float(model.logit_scale.exp()),
            "residual": learner.text_feature_residuals.detach().clone(), "test_logits": test_logits}


def run_clip_adapter(published: Path) -> dict:
    task = make_task(7, views=20, shots=8)   # 40 images: a last incomplete batch of 32, dropped
    ns = dassl_trainers(published)
    definitions(published / "CLIP-Adapter/clip_adapter.py", ["Adapter", "CustomCLIP", "CLIP_Adapter"], ns)
    dim, epochs = task["text"].shape[0], 200
    text = task["text"].T.clone()
    with on_cpu():
        torch.manual_seed(task["seed"])                       # the adapter's initial draw
        model = module_of(ns["CustomCLIP"], logit_scale=logit_scale(), dtype=torch.float32,
                          adapter=ns["Adapter"](dim, 4), text_encoder=lambda: text)
        test_logits = run_dassl_method(published, task, ns, ns["CLIP_Adapter"], model,
                                       dassl_optim("sgd", 2e-3, epochs, 5e-4), 32, epochs, "adapter")
    return {"task": task, "scale": float(model.logit_scale.exp()), "adapter": model.adapter.state_dict(),
            "test_logits": test_logits}


def run_prolip(published: Path) -> dict:
    out = {}
    for family, backbone, seed in (("resnet", "RN50", 8), ("vit", "ViT-B/16", 9)):
        task = make_task(seed, dim=16)
        gen = torch.Generator().manual_seed(seed + 100)
        width = 20
        pre_views = torch.randn(10, len(task["train_labels"]), width, generator=gen)
        pre_test = torch.randn(len(task["test_labels"]), width, generator=gen)
        weight = torch.randn(width, task["text"].shape[0], generator=gen) / math.sqrt(width)   # W×D
        bias = 0.1 * torch.randn(task["text"].shape[0], generator=gen) if family == "resnet" else None
        repo = published / "ProLIP"
        ns = base_namespace()
        definitions(repo / "methods/utils.py", ["cls_acc", "compute_image_features"], ns)
        definitions(repo / "methods/method.py", ["FSCLIPmethod"], ns)
        definitions(repo / "methods/ProLIP.py", ["VisProjRN", "VisProjViT", "ProLIP"], ns)
        ns["compute_image_features_test"] = None
        with tempfile.TemporaryDirectory() as tmp, on_cpu():
            name = "ViTB16" if backbone == "ViT-B/16" else backbone
            folder = Path(tmp) / f"features_{name}_fixture" / f"{task['shots']}_shot" / "seed1"
            folder.mkdir(parents=True)
            torch.save(task["train_labels"], folder / "label.pth")
            for v in range(len(pre_views)):
                torch.save(pre_views[v].clone(), folder / f"f{v}.pth")
            model = nn.Module()
            model.visual = nn.Module()
            if family == "resnet":
                model.visual.attnpool = nn.Module()
                model.visual.attnpool.c_proj = nn.Linear(width, weight.shape[1])
                model.visual.attnpool.c_proj.weight = nn.Parameter(weight.T.contiguous())
                model.visual.attnpool.c_proj.bias = nn.Parameter(bias.clone())
                state = {}
            else:
                state = {"visual.proj": weight.clone()}
            test_loader = Loader(task["test_labels"], 256)
            model.encode_image = lambda idx: pre_test[idx].clone()
            cfg = {"backbone": backbone, "dataset": "fixture", "root_path": tmp, "aug_views": 10, "train_epoch": 300,
                   "search_lr": False, "lr_v": 1e-5, "lambda_funct_1_N": True, "lambda_funct_1_N2": False,
                   "lambda_v": 0.1, "save_checkpoints": False}
            method = ns["ProLIP"](cfg)
            text = task["text"]
            _, frame = returning_locals(method.forward, None, None, test_loader, None, None, None, None, text, None,
                                        None, None, model, state, list(range(text.shape[1])), 1, task["shots"], "x",
                                        None)
        proj = frame["proj"]
        trained = proj.linear.weight.detach().T.clone() if family == "resnet" else proj.vit_proj.detach().clone()
        out[family] = {"task": task, "pre_views": pre_views, "pre_test": pre_test, "weight": weight, "bias": bias,
                       "trained": trained, "test_logits": frame["logits_test"].detach()}
    return out


def package(name: str, folder: Path):
    """A published repository's package imported under another name (CoOp's ``clip`` is OpenAI's,
    which this project's own ``clip`` would shadow)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


COOP_CLASSES = ["red circle", "blue_square", "green triangle with stripes", "dog", "a very long class name here"]


def coop_inputs(seed: int, steps: int, classes: int, images: int, dim: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(images // classes + 1)[:images]
    return {"features": [torch.randn(images, dim, generator=gen) for _ in range(steps)],
            "labels": [labels[torch.randperm(images, generator=gen)] for _ in range(steps)]}


def run_coop(published: Path) -> dict:
    """CoOp's PromptLearner, TextEncoder and CustomCLIP, and its trainer's step with Dassl's
    TrainerX loop, on OpenAI's CLIP (CoOp's vendored ``clip``) built from the same random weights
    as the open_clip model this project prompts; each epoch one batch of given image features."""
    import open_clip
    from clip.weights import load_open_clip
    open_clip.add_model_config(COOP_MODEL)
    ours = load_open_clip(COOP_MODEL.stem, None)
    # OpenAI's build_model stores the weights in float16 (convert_weights) before CoOp's fp32 mode
    # widens them: both models hold the float16-rounded weights (the test rounds its model the same way)
    ours.load_state_dict({k: v.half().float() for k, v in ours.state_dict().items()})
    openai = package("coop_clip", published / "CoOp" / "clip")
    out = {"model": COOP_MODEL.stem, "classes": COOP_CLASSES}
    for variant, options in {"end": dict(N_CTX=16, CTX_INIT="", CSC=False, CLASS_TOKEN_POSITION="end"),
                             "middle_csc": dict(N_CTX=8, CTX_INIT="", CSC=True, CLASS_TOKEN_POSITION="middle"),
                             "init_front": dict(N_CTX=4, CTX_INIT="a photo of a", CSC=False,
                                                CLASS_TOKEN_POSITION="front")}.items():
        model = openai.model.build_model({k: v.clone() for k, v in ours.state_dict().items()}).float()
        ns = dassl_trainers(published)
        ns |= {"clip": openai.clip, "_tokenizer": openai.simple_tokenizer.SimpleTokenizer()}
        definitions(published / "CoOp/trainers/coop.py", ["TextEncoder", "PromptLearner", "CustomCLIP", "CoOp"], ns)
        steps, seed = 20, 3
        inputs = coop_inputs(seed, steps, len(COOP_CLASSES), 20, model.text_projection.shape[1])
        cfg = types.SimpleNamespace(TRAINER=types.SimpleNamespace(COOP=types.SimpleNamespace(PREC="fp32", **options)),
                                    INPUT=types.SimpleNamespace(SIZE=(model.visual.input_resolution,)),
                                    TRAIN=types.SimpleNamespace(PRINT_FREQ=10 ** 9),
                                    OPTIM=dassl_optim("sgd", 0.002, steps, 5e-4))
        with on_cpu():
            torch.manual_seed(seed)                 # the context's N(0, 0.02²) draw
            custom = ns["CustomCLIP"](cfg, COOP_CLASSES, model)
            custom.image_encoder = nn.Identity()    # the batches are CLIP's image features already
            for name, param in custom.named_parameters():
                param.requires_grad_("prompt_learner" in name)
            initial = custom.prompt_learner.ctx.detach().clone()

            class Batches(Loader):
                def __iter__(self):
                    self.pass_index += 1
                    yield {"img": inputs["features"][self.pass_index], "label": inputs["labels"][self.pass_index]}

                def __len__(self):
                    return 1
            trainer = new_trainer(ns["CoOp"], cfg, Batches(inputs["labels"][0], 20), steps)
            trainer.model = custom
            optim = ns["build_optimizer"](custom.prompt_learner, cfg.OPTIM)
            trainer.register_model("prompt_learner", custom.prompt_learner, optim,
                                   ns["build_lr_scheduler"](optim, cfg.OPTIM))
            losses, lrs, kept = [], [], {}
            for trainer.epoch in range(steps):
                lrs.append(optim.param_groups[0]["lr"])
                with torch.no_grad():
                    losses.append(F.cross_entropy(custom(inputs["features"][trainer.epoch]),
                                                  inputs["labels"][trainer.epoch]).item())
                trainer.run_epoch()
                if trainer.epoch + 1 in (1, 5, 20):
                    kept[trainer.epoch + 1] = custom.prompt_learner.ctx.detach().clone()
            with torch.no_grad():
                text = custom.text_encoder(custom.prompt_learner(), custom.tokenized_prompts)
        out["inputs"] = inputs   # the same batches for every variant
        out[variant] = {"options": options, "seed": seed, "initial": initial, "losses": losses,
                        "lrs": lrs, "ctx": kept, "scale": float(model.logit_scale.exp()), "text": text,
                        "tokens": custom.tokenized_prompts}
    # Dassl's schedule over several steps per epoch (the learning rate of every step)
    ns = dassl_trainers(published)
    param = nn.Parameter(torch.zeros(1))
    optim_cfg = dassl_optim("sgd", 0.002, 50, 5e-4)
    optim = ns["build_optimizer"](nn.ParameterList([param]), optim_cfg)
    sched = ns["build_lr_scheduler"](optim, optim_cfg)
    rates = []
    with warnings_quiet():
        for _ in range(50):
            rates += [optim.param_groups[0]["lr"]] * 3
            sched.step()
    out["schedule"] = {"epochs": 50, "per_epoch": 3, "rates": rates}
    return out


@contextlib.contextmanager
def warnings_quiet():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


RUNS = {"tip_adapter": run_tip, "gda": run_gda, "lp_plus_plus": run_lp_plus_plus, "ape": run_ape,
        "clap": run_clap, "task_res": run_task_res, "clip_adapter": run_clip_adapter, "prolip": run_prolip,
        "coop": run_coop}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", required=True, type=Path, help="folder of the checkouts named in REPOSITORIES")
    parser.add_argument("--methods", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        with torch.random.fork_rng(devices=[]):
            outputs = RUNS[name](args.published)
        commits = {folder: f"{repo}@{commit}" for folder, (repo, commit) in REPOSITORIES.items()}
        torch.save({"outputs": outputs, "published": commits, "torch": str(torch.__version__)}, args.out / f"{name}.pt")
        print(f"{name}: {args.out / f'{name}.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
