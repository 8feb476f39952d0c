"""Dataset readers (CoOp layout), the few-shot sampler, transforms and loaders."""
from .base import DatasetSplits, Datum, ShiftSet
from .coop import BENCHMARK, LAYOUTS, read_coop_dataset
from .fewshot import (SAMPLER_VERSION, few_shot, sample_digest, sample_per_class, save_list, saved_meta,
                      saved_sample_differs, validation_from_train)
from .folder import folder_root, read_folder_dataset
from .imagenet import SHIFT_LAYOUTS, read_classnames, read_imagenet, read_shift_set


def load_dataset(cfg, writes: bool = True) -> DatasetSplits:
    """The dataset a config names: ImageNet with the config's shift sets, your own folders,
    the generated demo (made on first use), or one of the CoOp datasets. ``writes`` False: a
    tool's look at the data writes nothing (no demo generated, no listing or split recorded)."""
    cache_dir = cfg.cache_dir if writes else None
    if cfg.dataset == "imagenet":
        data = read_imagenet(cfg.data_path, cache_dir)
        wnids, names = read_classnames(data.root)
        for kind, path in cfg.shift_sets.items():  # ImageNet-V2 / -Sketch / -A / -R, with ImageNet's classes
            data.shift_sets[kind] = read_shift_set(kind, path, wnids, names)
        return data
    if cfg.dataset == "folder":  # your own images: <data_path>/<class name>/*.jpg
        return read_folder_dataset(cfg.data_path, cfg.split_fractions, cfg.split_seed, cache_dir, cfg.templates)
    if cfg.dataset == "demo" and writes:
        from .demo import ensure_demo_dataset
        ensure_demo_dataset(cfg.data_path)  # generated once, offline
    return read_coop_dataset(cfg.dataset, cfg.data_path)


__all__ = ["DatasetSplits", "Datum", "ShiftSet", "BENCHMARK", "LAYOUTS", "read_coop_dataset", "few_shot", "sample_per_class",
           "save_list", "validation_from_train", "SAMPLER_VERSION", "sample_digest", "saved_meta", "saved_sample_differs",
           "folder_root", "read_folder_dataset", "SHIFT_LAYOUTS", "read_imagenet", "read_shift_set", "load_dataset"]
