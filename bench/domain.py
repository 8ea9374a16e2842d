"""In-domain check: AUROC and false alarms of the domain check against real photographs.

In domain: the test split's features and its perturbed copies (the transform stage's
data/features/robust/); out of domain: every photograph and picture that ships in scikit-image,
matplotlib and scikit-learn, decoded by the model's own `open_image` and encoded by its
frozen encoder. Candidates: Mahalanobis distance of the pooled features with the covariance
shrunk by each `--shrinkage`, and k-nearest-neighbour distance; each is fitted on the training
images and their views, its threshold at the validation split's `--quantile`.

    .venv/bin/python bench/domain.py --features data/features --model artifacts/model/model.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ImageError, load, open_image  # noqa: E402
from model.domain import fit, pooled_features  # noqa: E402
from model.encoders import pooled  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff")


def packaged_pictures() -> dict[str, bytes]:
    """name -> file bytes of every image file shipped in scikit-image's, matplotlib's and
    scikit-learn's data folders."""
    import matplotlib
    import skimage
    import sklearn

    folders = {
        "skimage": Path(skimage.__file__).parent / "data",
        "matplotlib": Path(matplotlib.get_data_path()) / "sample_data",
        "sklearn": Path(sklearn.__file__).parent / "datasets" / "images",
    }
    found = {}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found[f"{package}/{path.relative_to(folder)}"] = path.read_bytes()
    return found


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an out-of-domain distance > an in-domain one), ties counted half."""
    greater = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(greater + ties / 2)


def knn_distance(train: torch.Tensor, queries: torch.Tensor, k: int) -> np.ndarray:
    """Distance to the k-th nearest training vector, on L2-normalised features."""
    a = torch.nn.functional.normalize(train, dim=1)
    b = torch.nn.functional.normalize(queries, dim=1)
    return torch.cdist(b, a).kthvalue(k, dim=1).values.numpy()  # (Q,)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    parser.add_argument("--model", default="artifacts/model/model.pth")
    parser.add_argument("--shrinkage", type=float, nargs="+", default=[0.01, 0.1, 0.3])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--quantile", type=float, default=0.99)
    args = parser.parse_args()
    feats = args.features
    views = feats / "train_views.npy"
    train = pooled_features(np.load(feats / "train.npy", mmap_mode="r"))
    if views.is_file():
        train = torch.cat([train, pooled_features(np.load(views, mmap_mode="r"))])
    val = pooled_features(np.load(feats / "val.npy", mmap_mode="r"))
    test = pooled_features(np.load(feats / "test.npy", mmap_mode="r"))
    robust = {
        p.stem: pooled_features(np.load(p, mmap_mode="r"))
        for p in sorted((feats / "robust").glob("*.npy"))
    }
    captioner = load(args.model)
    pictures = packaged_pictures()
    photos, refused = [], []
    for name, data in list(pictures.items()):
        try:
            image = open_image(data)
        except ImageError:  # what the server refuses too: it never reaches the check
            refused.append(name)
            del pictures[name]
            continue
        pixels = captioner.preprocess(image)[None]  # (1, 3, S, S)
        photos.append(pooled(captioner.model.encode_image(pixels)).float())
    photos = torch.cat(photos)  # (P, C)
    print(
        f"{len(train)} training vectors, {len(val)} val, {len(test)} test, "
        f"{len(photos)} packaged pictures, model {args.model}\n"
    )
    methods = {}
    for s in args.shrinkage:
        check = fit(train, val, s, args.quantile)
        methods[f"mahalanobis, shrinkage {s}"] = (check.distance, check.threshold)
    for k in args.k:
        threshold = float(np.quantile(knn_distance(train, val, k), args.quantile))
        methods[f"kNN, k={k}"] = (lambda q, k=k: knn_distance(train, q, k), threshold)
    head = "| method | AUROC test vs pictures | test false alarms | pictures flagged | nearest picture / threshold |"
    print(head + " " + " | ".join(robust) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(robust))
    flagged_names = {}
    for name, (distance, threshold) in methods.items():
        d_test, d_photo = np.asarray(distance(test)), np.asarray(distance(photos))
        kept = [f"{(np.asarray(distance(x)) <= threshold).mean():.3f}" for x in robust.values()]
        print(
            f"| {name} | {auroc(d_test, d_photo):.4f} | {(d_test > threshold).mean():.3f} | "
            f"{(d_photo > threshold).mean():.3f} | {d_photo.min() / threshold:.1f} | "
            + " | ".join(kept)
            + " |"
        )
        flagged_names[name] = [n for n, d in zip(pictures, d_photo) if d <= threshold]
    print("\n(perturbed columns: fraction of the perturbed test copies kept in domain)")
    print(f"not decodable by open_image (left out): {', '.join(refused) or 'none'}")
    for name, missed in flagged_names.items():
        print(f"{name}: pictures called in domain: {', '.join(missed) or 'none'}")


if __name__ == "__main__":
    main()
