"""Measure the spread of the sharing_code chapter's trained-model claims (issue 21).

For several seeds: the shared-teacher experiment (numpy, float64) and the source's
Keras CNN (float32) with its PyTorch twin, as in ``book/sharing_code.ipynb``. Adds the
values to ``book/_data/spread/sharing_code.json`` under the given machine label; run
once on the host and once under the second-machine settings.
"""

import argparse
import json
import os
import pathlib
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _collect import collect  # tools/spread/_collect.py, beside this script

from companion import numpy as cn

OUT = pathlib.Path(__file__).parents[2] / "book" / "_data" / "spread"
OUT = OUT / "sharing_code.json"
CHAPTER = "sharing_code"
TEACHER = (
    "the shared layer learns the shared teacher and generalises; "
    "its unshared twin does not"
)
CNN = "the source's Keras CNN learns the digits in two epochs (chance 0.1)"
TWIN = (
    "the PyTorch twin computes the Keras CNN's probabilities; "
    "without the permutation it does not"
)
CLAIMS = {
    "shared final / first training loss": (
        TEACHER,
        "runs['shared'].losses[-1] < 0.01 * runs['shared'].losses[0]",
    ),
    "shared test loss / noise floor": (
        TEACHER,
        "test_loss['shared'] < 1.5 * noise_floor",
    ),
    "unshared test loss / shared test loss": (
        TEACHER,
        "test_loss['unshared'] > 2 * test_loss['shared']",
    ),
    "Keras CNN last / first epoch loss": (
        CNN,
        "history.history['loss'][-1] < 0.6 * history.history['loss'][0]",
    ),
    "Keras CNN test accuracy": (CNN, "test_accuracy > 0.75"),
    "torch twin max probability difference": (
        TWIN,
        "assert_close(torch_probabilities, keras_probabilities, rtol=0, atol=1e-5)",
    ),
    "torch twin same class as Keras": (TWIN, "agree >= 0.99"),
    "unpermuted twin same class as Keras": (TWIN, "naive_agree < 0.3"),
}


def shared_teacher(seed):
    P, D_in, D_out = 8, 6, 4
    x_train, y_train, x_test, y_test = cn.make_shared_teacher_data(
        16, P, D_in, D_out, noise=0.05, rng=seed
    )
    test_loss = {}
    for kind in ("shared", "unshared"):
        run = cn.train_shared_dense(
            x_train,
            y_train,
            shared=(kind == "shared"),
            steps=300,
            learning_rate=0.1,
            rng=seed,
        )
        test_loss[kind] = cn.dense_loss(run.predict(x_test), y_test)
        if kind == "shared":
            drop = run.losses[-1] / run.losses[0]
    noise_floor = 0.5 * P * D_out * 0.05**2
    return {
        "shared final / first training loss": float(drop),
        "shared test loss / noise floor": float(test_loss["shared"] / noise_floor),
        "unshared test loss / shared test loss": float(
            test_loss["unshared"] / test_loss["shared"]
        ),
    }


def keras_cnn(seed):
    import keras
    import torch

    import companion.tensorflow  # noqa: F401
    from companion.digits import digits_dataset
    from companion.sources import run_source
    from companion.torch import SourceCNN

    keras.utils.set_random_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = run_source("keras_cnn")["model"]
    train = digits_dataset(1500, seed=0)
    test = digits_dataset(500, seed=1)
    x_train = train.images.transpose(0, 2, 3, 1)
    x_test = test.images.transpose(0, 2, 3, 1)
    keras.utils.set_random_seed(seed)
    history = model.fit(x_train, train.labels, epochs=2, batch_size=32, verbose=0)
    _, test_accuracy = model.evaluate(x_test, test.labels, verbose=0)
    twin = SourceCNN.from_keras(model).eval()
    with torch.no_grad():
        torch_p = twin(torch.from_numpy(test.images)).numpy()
    keras_p = model.predict(x_test, verbose=0)
    dense_kernel = model.layers[5].kernel.numpy()
    with torch.no_grad():
        twin.dense1.weight.copy_(torch.from_numpy(dense_kernel.T.copy()))
        naive_p = twin(torch.from_numpy(test.images)).numpy()
    loss = history.history["loss"]
    return {
        "Keras CNN last / first epoch loss": float(loss[-1] / loss[0]),
        "Keras CNN test accuracy": float(test_accuracy),
        "torch twin same class as Keras": float(
            np.mean(torch_p.argmax(1) == keras_p.argmax(1))
        ),
        "torch twin max probability difference": float(np.abs(torch_p - keras_p).max()),
        "unpermuted twin same class as Keras": float(
            np.mean(naive_p.argmax(1) == keras_p.argmax(1))
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machine", choices=["host", "avx2-1thread"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--collect", nargs="+", metavar="LOG", help="merge run logs")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect, CLAIMS, CHAPTER, OUT)
        return
    if args.machine is None:
        raise SystemExit("--machine is required unless --collect is given")
    for seed in args.seeds:
        for metric, value in {**shared_teacher(seed), **keras_cnn(seed)}.items():
            row = {"metric": metric, "seed": seed, "machine": args.machine}
            print(json.dumps({**row, "value": value}), flush=True)


if __name__ == "__main__":
    main()
