"""Frozen-trunk outputs, computed as rarely as the method allows (doc/method.md §9).

The trunk is frozen, so its output for an (image, transform) pair never changes:
- evaluation: val/test feature maps and CLIP's pooled features are computed once per
  (weights, image list, transform) and stored memory-mapped on disk (``caches.eval_store``,
  on the stores of ``store``);
- training, ``train_views: V``: V augmented views per training image are computed once and
  cycled through the epochs (``sources.ViewSource``);
- training, faithful mode (default): a fresh augmentation of every image in every epoch, the
  trunk run on the fly, but each image decoded only once per run (``decode``) and augmented
  in batches on the device (``sources.LiveSource``).
All three yield batches of ``(feature map, v0, labels)`` to the same training/eval loops.
"""
from datasets.augment import augment, crop_params

from .caches import eval_store, live_batches, view_store
from .decode import decode_images
from .sources import LiveSource, PublishedSource, ViewSource, encode_share, share_rounding
from .store import FeatureStore, build_store, cached_store

__all__ = ["FeatureStore", "LiveSource", "PublishedSource", "ViewSource", "augment", "build_store", "cached_store", "crop_params",
           "decode_images", "encode_share", "eval_store", "live_batches", "share_rounding", "view_store"]
