"""Dataset readers (CoOp layout), the few-shot sampler, transforms and loaders."""
from .base import DatasetSplits, Datum, ShiftSet
from .coop import LAYOUTS, read_coop_dataset
from .folder import read_folder_dataset
from .fewshot import (SAMPLER_VERSION, few_shot, sample_digest, sample_per_class, save_list, saved_sample_differs,
                      validation_from_train)
from .imagenet import SHIFT_LAYOUTS, read_imagenet, read_shift_set

__all__ = ["DatasetSplits", "Datum", "ShiftSet", "LAYOUTS", "read_coop_dataset", "few_shot", "sample_per_class",
           "save_list", "validation_from_train", "SAMPLER_VERSION", "sample_digest", "saved_sample_differs", "read_folder_dataset", "SHIFT_LAYOUTS", "read_imagenet",
           "read_shift_set"]
