"""Image-folder data from a local path: DIR/<class>/<image> or DIR/train/<class>/... (+ DIR/val/...)."""

from __future__ import annotations

from pathlib import Path

from latprof.errors import UsageError, require

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_folders(root, img_size: int):
    """(train dataset, val dataset or None). The class list of val must equal train's."""
    tv = require("torchvision", "train")
    T = tv.transforms
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data directory {root} does not exist", "pass --data DIR with DIR/<class>/<image> folders")
    train_dir, val_dir = (root / "train", root / "val") if (root / "train").is_dir() else (root, None)
    train_tf = T.Compose([T.RandomResizedCrop(img_size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                          T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_tf = T.Compose([T.Resize((img_size, img_size)), T.ToTensor(), T.Normalize(MEAN, STD)])
    train = _folder(tv, train_dir, train_tf)
    val = _folder(tv, val_dir, eval_tf) if val_dir is not None and val_dir.is_dir() else None
    if val is not None and val.classes != train.classes:
        raise UsageError(f"{val_dir} has classes {val.classes[:5]}..., {train_dir} has {train.classes[:5]}...",
                         "use the same class folders in train/ and val/")
    return train, val


def _folder(tv, path: Path, transform):
    try:
        ds = tv.datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(f"no images under {path} ({str(exc).splitlines()[0][:120]})",
                         "lay the data out as DIR/<class>/<image>.jpg (or DIR/train/... and DIR/val/...)") from None
    if len(ds.classes) < 2:
        raise UsageError(f"{path} has {len(ds.classes)} class folder(s)", "give at least two class folders")
    return ds
