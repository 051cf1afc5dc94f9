"""Measure the spread of the vision chapter's trained-model claims (issue 21).

Trains the chapter's three networks and its four vision transformers (float64, one
thread, as in ``book/vision.ipynb``) for several seeds and adds the accuracies to
``book/_data/spread/vision.json`` under the given machine label. Run once on the host
and once under the second-machine settings (``--machine avx2-1thread``); the
notebook's asserts are set from the spread.
"""

import argparse
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from _collect import collect  # tools/spread/_collect.py, beside this script

from companion.data import SHAPE_NAMES, shape_offsets, shapes_dataset
from companion.torch.models import LocallyConnectedNet, MLPClassifier, SmallCNN
from companion.torch.vit import VisionTransformer

IMAGE, CLASSES = 12, len(SHAPE_NAMES)
NAMES = ["MLP", "locally connected", "CNN"]
CHAPTER = "vision"
SEEN = "every network learns the task at the training positions"
UNSEEN = (
    "only the CNN recognises the shapes at unseen positions; the others near chance"
)
COLUMN = "column by column: the CNN is right everywhere, the others drop after the edge"
CLAIMS = {
    "MLP seen accuracy": (SEEN, "results['MLP'][0] >= 0.85"),
    "locally connected seen accuracy": (
        SEEN,
        "results['locally connected'][0] >= 0.85",
    ),
    "CNN seen accuracy": (SEEN, "results['CNN'][0] >= 0.85"),
    "CNN unseen accuracy": (UNSEEN, "results['CNN'][1] >= 0.95"),
    "MLP unseen accuracy": (UNSEEN, "results['MLP'][1] <= 0.5"),
    "locally connected unseen accuracy": (
        UNSEEN,
        "results['locally connected'][1] <= 0.5",
    ),
    "CNN lowest column accuracy": (COLUMN, "by_column['CNN'].min() >= 0.9"),
    "MLP highest unseen column accuracy": (
        COLUMN,
        "by_column['MLP'][first_unseen:].max() <= 0.7",
    ),
    "locally connected highest unseen column accuracy": (
        COLUMN,
        "by_column['locally connected'][first_unseen:].max() <= 0.7",
    ),
}
VIT_SEEN = "the ViT learns the task at the training positions"
VIT_UNSEEN = (
    "the ViT (cls, learned) carries most of it to unseen positions, below the CNN"
)
VIT_SINUSOIDAL = (
    "fixed 2-D sinusoidal positions transfer worse to unseen positions than learned"
)
VIT_ATTENTION = (
    "the class token's first-layer attention favours the patches holding the shape"
)
CLAIMS.update(
    {
        "ViT seen accuracy": (VIT_SEEN, "vit[MAIN][0] >= 0.9"),
        "ViT unseen accuracy": (
            VIT_UNSEEN,
            "0.85 <= vit[MAIN][1] < results['CNN'][1]",
        ),
        "ViT 5-epoch seen accuracy": (VIT_SEEN, "(prose only)"),
        "ViT 5-epoch unseen accuracy": (VIT_UNSEEN, "(prose only)"),
        "ViT mean-pooled seen accuracy": (VIT_SEEN, "(prose only)"),
        "ViT mean-pooled unseen accuracy": (VIT_UNSEEN, "(prose only)"),
        "ViT sinusoidal seen accuracy": (VIT_SINUSOIDAL, "(prose only)"),
        "ViT sinusoidal unseen accuracy": (
            VIT_SINUSOIDAL,
            "vit[('cls', 'sinusoidal')][1] <= 0.85",
        ),
        "ViT mean-pooled sinusoidal seen accuracy": (VIT_SINUSOIDAL, "(prose only)"),
        "ViT mean-pooled sinusoidal unseen accuracy": (
            VIT_SINUSOIDAL,
            "vit[('mean', 'sinusoidal')][1] <= 0.85",
        ),
        "ViT attention on shape patches": (
            VIT_ATTENTION,
            "on_shape >= 1.2 * holds_shape.mean()",
        ),
        "share of patches holding the shape": (VIT_ATTENTION, "(prose only)"),
    }
)
# the chapter's vision transformers: (pooling, positions) -> name of their metrics
VITS = {
    ("cls", "learned"): "ViT",
    ("mean", "learned"): "ViT mean-pooled",
    ("cls", "sinusoidal"): "ViT sinusoidal",
    ("mean", "sinusoidal"): "ViT mean-pooled sinusoidal",
}
VIT_EPOCHS = 10  # twice the CNN's
OUT = pathlib.Path(__file__).parents[2] / "book" / "_data" / "spread" / "vision.json"


def make(name, seed):
    torch.manual_seed(seed)
    return {
        "MLP": lambda: MLPClassifier(IMAGE, CLASSES, hidden=(64, 64)),
        "locally connected": lambda: LocallyConnectedNet(
            IMAGE, CLASSES, channels=(8, 16)
        ),
        "CNN": lambda: SmallCNN(CLASSES, channels=(8, 16)),
    }[name]().double()


def make_vit(pooling, positions, seed):
    torch.manual_seed(seed)
    return VisionTransformer(
        IMAGE,
        3,
        CLASSES,
        embed_dim=8,
        num_heads=2,
        num_layers=2,
        mlp_hidden=16,
        pooling=pooling,
        positions=positions,
    ).double()


@torch.no_grad()
def attention_on_shape(model, data):
    """Mean share of the class token's first-layer attention (averaged over heads) on
    the patches that hold part of the shape (a pixel above 0.5), and the mean share of
    such patches."""
    _, weights = model.encode(tensor(data.images), return_weights=True)
    from_cls = weights[0][:, :, 0, 1:].mean(dim=1).numpy()  # (B, N)
    p, B = model.patch_size, len(data.images)
    patches = data.images.reshape(B, IMAGE // p, p, IMAGE // p, p)
    holds_shape = (patches.max(axis=(2, 4)) > 0.5).reshape(B, -1)  # (B, N)
    return (from_cls * holds_shape).sum(1).mean(), holds_shape.mean()


def tensor(images):
    return torch.from_numpy(images.astype(np.float64))


def train_classifier(model, data, epochs=5, batch=50, lr=3e-3, seed=0):
    images, labels = tensor(data.images), torch.from_numpy(data.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    per_epoch = len(labels) // batch
    for step in range(epochs * per_epoch):
        if step % per_epoch == 0:
            permutation = torch.randperm(len(labels), generator=order)
        idx = permutation[(step % per_epoch) * batch :][:batch]
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def correct(model, data):
    return model(tensor(data.images)).argmax(dim=1).numpy() == data.labels


def measure(seed):
    train = shapes_dataset(1200, split="train", image_size=IMAGE, seed=0)
    seen = shapes_dataset(500, split="train", image_size=IMAGE, seed=1)
    unseen = shapes_dataset(500, split="test", image_size=IMAGE, seed=2)
    everywhere = shapes_dataset(2000, split="all", image_size=IMAGE, seed=3)
    columns = shape_offsets("all", IMAGE)[1]
    first_unseen = len(shape_offsets("train", IMAGE)[1])
    values = {}
    for name in NAMES:
        model = make(name, seed)
        train_classifier(model, train, seed=seed)
        values[f"{name} seen accuracy"] = float(correct(model, seen).mean())
        values[f"{name} unseen accuracy"] = float(correct(model, unseen).mean())
        hits = correct(model, everywhere)
        by_column = np.array(
            [hits[everywhere.offsets[:, 1] == c].mean() for c in columns]
        )
        values[f"{name} lowest column accuracy"] = float(by_column.min())
        values[f"{name} highest unseen column accuracy"] = float(
            by_column[first_unseen:].max()
        )
    for (pooling, positions), name in VITS.items():
        model = make_vit(pooling, positions, seed)
        train_classifier(model, train, epochs=VIT_EPOCHS, seed=seed)
        values[f"{name} seen accuracy"] = float(correct(model, seen).mean())
        values[f"{name} unseen accuracy"] = float(correct(model, unseen).mean())
        if name == "ViT":
            on_shape, share = attention_on_shape(model, unseen)
            values["ViT attention on shape patches"] = float(on_shape)
            values["share of patches holding the shape"] = float(share)
    model = make_vit("cls", "learned", seed)
    train_classifier(model, train, epochs=5, seed=seed)
    values["ViT 5-epoch seen accuracy"] = float(correct(model, seen).mean())
    values["ViT 5-epoch unseen accuracy"] = float(correct(model, unseen).mean())
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machine", choices=["host", "avx2-1thread"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--collect", nargs="+", metavar="LOG", help="merge run logs")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect, CLAIMS, CHAPTER, OUT)
        return
    torch.set_num_threads(1)
    if args.machine is None:
        raise SystemExit("--machine is required unless --collect is given")
    for seed in args.seeds:
        for metric, value in measure(seed).items():
            row = {"metric": metric, "seed": seed, "machine": args.machine}
            print(json.dumps({**row, "value": value}), flush=True)


if __name__ == "__main__":
    main()
