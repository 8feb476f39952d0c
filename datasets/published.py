"""The split and description files the published RAFT code ships (WideStars/RA-FT), pinned to
one commit: where each lies there, its git blob id and size, and which dataset of this project
reads it where. ``scripts/get_files.py`` downloads them against these ids; runs record whether
their description file is the published one (doc/datasets.md)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = "WideStars/RA-FT"
COMMIT = "dcf511562319f3a7e0ed53c31b562ec8c8ecb08b"
RAW_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}"


@dataclass(frozen=True)
class PublishedFile:
    path: str             # in the published repository
    git_blob: str         # SHA-1 of b"blob <size>\0" + content
    size: int | None      # bytes, where known
    dataset: str          # this project's dataset name
    kind: str             # "split" (into the dataset's folder) or "descriptions" (into gpt3_file/)

    @property
    def target_name(self) -> str:
        """The file's name where this project reads it."""
        return Path(self.path).name


def _files(kind: str, rows: str) -> list[PublishedFile]:
    out = []
    for row in rows.strip().splitlines():
        dataset, path, blob, size = row.split()
        out.append(PublishedFile(path, blob, None if size == "-" else int(size), dataset, kind))
    return out


PUBLISHED_FILES: list[PublishedFile] = _files("split", """
    fgvc            datasets/jsons/images_variant_train.txt          2fba86dc13cbd46981c0d01678d8618327f1bb84  54873
    caltech101      datasets/jsons/split_zhou_Caltech101.json        8be694a80de04a39fb159c462bea9696aa47ccf1  809184
    dtd             datasets/jsons/split_zhou_DescribableTextures.json 8dd197a94b598fa44ee3c9e35c486dd017ab00a7 563702
    eurosat         datasets/jsons/split_zhou_EuroSAT.json           6bdc847a5d5c49dcc78e8cb8707b87198cbfa5a4  3006492
    food101         datasets/jsons/split_zhou_Food101.json           39557040ee6501bd32aa8b5dfd75f7941a32f0a7  -
    oxford_flowers  datasets/jsons/split_zhou_OxfordFlowers.json     8d10037b0690b6c65e307a354b039efb0f42404c  771139
    oxford_pets     datasets/jsons/split_zhou_OxfordPets.json        fa821d9f9e7d32fdf3640bf74fa7491ed04f37da  724217
    sun397          datasets/jsons/split_zhou_SUN397.json            8d5725db8f70bcf02245665304f863e68f96a24c  -
    stanford_cars   datasets/jsons/split_zhou_StanfordCars.json      dcdb8264712e9940e74cfb0f06ddb8f9cc239b81  1855652
    ucf101          datasets/jsons/split_zhou_UCF101.json            ea87e3de7b4f6f00fdd77618e34a23508b4c5590  1557485
""") + _files("descriptions", """
    caltech101      gpt_file/caltech101_prompt.json                  1990ab4ab8bd416d4e54a5bd53b11bf7bba92f99  421183
    dtd             gpt_file/dtd_prompt.json                         8d66432094ad7a2ed104d0e722a99708cd8bc29d  197272
    eurosat         gpt_file/eurosat_prompt.json                     2689ca7893edaacc0ed863561213a4d3722a0481  15439
    fgvc            gpt_file/fgvc_prompt.json                        a33598845341654c41c585ba6fe17a3ac74791b6  845966
    food101         gpt_file/food101_prompt.json                     cbb438d59371af676a6d4342ef76d5f110e53b6d  685866
    imagenet        gpt_file/imagenet_prompt.json                    b5796c20e12c7448a9d78147fc9869b421d908d7  -
    oxford_flowers  gpt_file/oxford_flowers_prompt.json              9a5e5670d2f507f9ec513b0d73777a448bb8d334  200284
    oxford_pets     gpt_file/oxford_pets_prompt.json                 725ce24eebc21a26e646417150c4ca8d81029ac1  49571
    stanford_cars   gpt_file/stanford_cars_prompt.json               eddd019a944c0592f88eade8aecd20b179a107e8  905180
    sun397          gpt_file/sun397_prompt.json                      f314ba3d293e6ebddb1ee910443a9b315eddcd91  1890060
    ucf101          gpt_file/ucf101_prompt.json                      58f1bd7e61d27fb216036a92154768b8c940460d  697778
""")


def published_descriptions(dataset: str) -> PublishedFile | None:
    return next((f for f in PUBLISHED_FILES if f.dataset == dataset and f.kind == "descriptions"), None)


def git_blob_id(data: bytes) -> str:
    """Git's id of a file's content: SHA-1 over ``blob <size>\\0`` followed by the bytes."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def file_blob_id(path: str | Path) -> str:
    return git_blob_id(Path(path).read_bytes())
