"""How a model's images are prepared (size, statistics, resampling, fitting to the square), as
open_clip records it for the model's weights. Read by every place an image becomes a tensor:
the data loaders, the batched augmentation, the caches' keys, predict and visualize."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torchvision import transforms as T

from utils import RaftError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI's, open_clip's default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
RESIZE_MODES = ("shortest", "squash", "longest")
BICUBIC = INTERPOLATION["bicubic"]


@dataclass(frozen=True)
class Preprocess:
    """How a model's images are prepared, as open_clip records it for its weights: the side,
    the normalisation, the resampling filter and how the evaluation transform fits an image to
    the square (``shortest``: resize the short side, centre crop; ``squash``: resize to the
    square; ``longest``: resize the long side, pad with ``fill_color``). Training augmentation
    (a random resized crop) uses the side, filter and statistics; evaluation all of them."""
    size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def of(cls, record: dict, image_size, model: str = "the model") -> "Preprocess":
        """From open_clip's ``preprocess_cfg`` (missing entries: open_clip's defaults)."""
        size = record.get("size", image_size)
        sides = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if sides[0] != sides[1]:
            raise RaftError(f"{model} takes {sides[0]}×{sides[1]} images; RAFT's transforms make square ones")
        pre = cls(int(sides[0]), tuple(float(x) for x in record.get("mean", CLIP_MEAN)),
                  tuple(float(x) for x in record.get("std", CLIP_STD)), str(record.get("interpolation", "bicubic")),
                  str(record.get("resize_mode", "shortest")), int(record.get("fill_color", 0)))
        if pre.interpolation not in INTERPOLATION or pre.resize_mode not in RESIZE_MODES:
            raise RaftError(f"{model}'s preprocessing ({pre.interpolation}, {pre.resize_mode}) is not one RAFT "
                            f"implements: interpolation {', '.join(INTERPOLATION)}; resize mode {', '.join(RESIZE_MODES)}")
        return pre

    def record(self) -> dict:
        return asdict(self)


def as_preprocess(spec: Preprocess | int) -> Preprocess:
    """A model's ``Preprocess``, or a side alone (OpenAI's statistics, bicubic, shortest side)."""
    return spec if isinstance(spec, Preprocess) else Preprocess(int(spec))
