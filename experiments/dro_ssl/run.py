"""Real images: RSS (DROSSL) vs ERM vs plain pseudo-labelling on cached frozen ResNet-20 features.

    .venv/bin/python experiments/dro_ssl/make_shifted_pool.py      # once
    OMP_NUM_THREADS=1 .venv/bin/python experiments/dro_ssl/run.py  # writes results.{json,md} here

Data: the bundled CIFAR-10 training subset (5,000 JPEG images). Per seed s: 30 labelled images per class
(``few_shot_indices(seed=s)``, 300 in all) and, from the other images, 10 per class as the labelled
VALIDATION set used to pick hyper-parameters (100 images). Unlabelled pool: all 5,000 images with
Gaussian noise + contrast (severity 3, ``make_shifted_pool.py``), labels never used. Test: the 2,000
bundled CIFAR-10 test images, clean and with the same corruption ("shifted test").

Model: the method's own code (``DROSSL.surrogate``, ``DROSSL.pseudo_label``) in its default mode -- a
frozen backbone (eval mode) and perturbations in its 64-d feature space -- with the features computed
once (no augmentation), so the backbone's forward is not repeated every step. Linear head re-initialised
per seed (the ResNet-20's own CIFAR-10 head is NOT used). Same budget for every arm: Adam lr 1e-2, weight
decay 1e-3, 40 epochs of 10 labelled batches of 30 (+ 128 unlabelled per step, cycled through seeded
permutations of the pool), the first 10 epochs labelled-only (warm-up) for the arms that use the pool.

Arms: ERM (T = 0, lambda = 0); PL = plain pseudo-labelling (T = 0: CE on detached hard pseudo-labels,
lambda from a grid); RSS (T = 10, ascent step a, gamma, gamma' = gamma / 2, lambda from a grid). The
configuration of each arm is chosen per seed on validation accuracy; test numbers are read only for it.

Caveat: akamaster's ResNet-20 was trained on all 50,000 CIFAR-10 training images, these 5,000 included,
so the frozen features are far better than features of a truly new domain would be.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from robustft.data.fewshot import few_shot_indices
from robustft.data.shifts import corrupt
from robustft.data.sources import DatasetSpec, load_dataset
from robustft.data.transforms import eval_transform
from robustft.methods import DROSSL

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
POOL = REPO / "runs/dro_ssl/cifar10_5k_shifted.npz"


def shift(image: np.ndarray, i: int) -> np.ndarray:
    x = corrupt(image, "gaussian_noise", 3, np.random.default_rng([1, i]))
    return corrupt(x, "contrast", 3, np.random.default_rng([2, i]))


@torch.no_grad()
def features(model: DROSSL, images: list[Image.Image]) -> torch.Tensor:
    transform = eval_transform(model.preprocess)
    out = []
    model.eval()
    for k in range(0, len(images), 500):
        out.append(model.backbone(torch.stack([transform(im) for im in images[k : k + 500]])))
    return torch.cat(out)


def train_arm(model, xl, yl, xu, cfg, seed, epochs=40, warmup=10, batch=30, u_batch=128):
    torch.manual_seed(seed)
    model.head.reset_parameters()
    model.hparams.steps = cfg["steps"]
    model.hparams.ascent_lr = cfg.get("a", 0.0)
    model.hparams.gamma = cfg.get("gamma", 1.0)
    model.hparams.gamma_unlabeled = cfg.get("gamma", 1.0) / 2
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xl), generator=g)
        for k in range(0, len(xl), batch):
            idx = perm[k : k + batch]
            loss, _ = model.surrogate(xl[idx], yl[idx], model.hparams.gamma)
            if cfg["lam"] > 0 and epoch >= warmup:
                if len(order) < u_batch:
                    order = torch.cat([order, torch.randperm(len(xu), generator=g)])
                uidx, order = order[:u_batch], order[u_batch:]
                target = model.pseudo_label(None, xu[uidx])  # hard, detached, eval mode
                phi_u, _ = model.surrogate(xu[uidx], target, model.hparams.gamma_unlabeled)
                loss = loss + cfg["lam"] * phi_u
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def acc(model, x, y) -> float:
    return float((model.head(x).argmax(-1) == y).float().mean())


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    model = DROSSL(num_classes=10, backbone_weights=str(REPO / "data/weights/resnet20-12fca82f.th"), warmup_epochs=0)
    train = load_dataset(DatasetSpec(source="npz", path=str(REPO / "data/cifar10/cifar10_train_5k_jpeg.npz")), "train")
    test = load_dataset(DatasetSpec(source="npz", path=str(REPO / "data/cifar10/cifar10_test_2k.npz")), "test")
    pool = np.load(POOL)["images"]
    tr_imgs = [train.load_image(i).convert("RGB") for i in range(len(train))]
    te_imgs = [test.load_image(i).convert("RGB") for i in range(len(test))]
    f_train = features(model, tr_imgs)
    f_pool = features(model, [Image.fromarray(x) for x in pool])
    f_test = features(model, te_imgs)
    f_test_shift = features(model, [Image.fromarray(shift(np.asarray(im), 10_000 + i)) for i, im in enumerate(te_imgs)])
    y_train = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
    y_test = torch.as_tensor(np.asarray(test.labels), dtype=torch.long)
    print(f"features cached ({time.time() - start:.0f}s); feature norm {f_train.norm(dim=1).mean():.2f}", flush=True)

    arms = {
        "ERM": [{"steps": 0, "lam": 0.0}],
        "PL": [{"steps": 0, "lam": lam} for lam in (0.1, 0.3, 1.0, 3.0)],
        "RSS": [{"steps": 10, "a": a, "gamma": gm, "lam": lam}
                for a, gm, lam in itertools.product((0.3, 1.0), (0.3, 1.0, 3.0), (0.3, 1.0))],
    }
    results: dict = {arm: [] for arm in arms}
    for seed in range(5):
        labels = y_train.numpy()
        shots = few_shot_indices(labels, 30, seed, train.class_names)
        rest = np.setdiff1d(np.arange(len(labels)), shots)
        val = rest[few_shot_indices(labels[rest], 10, 100 + seed, train.class_names)]
        xl, yl = f_train[shots], y_train[shots]
        xv, yv = f_train[val], y_train[val]
        for arm, cfgs in arms.items():
            best = None
            for cfg in cfgs:
                train_arm(model, xl, yl, f_pool, cfg, seed)
                score = acc(model, xv, yv)
                if best is None or score > best[0]:
                    best = (score, cfg, acc(model, f_test, y_test), acc(model, f_test_shift, y_test))
            results[arm].append({"seed": seed, "val": best[0], "cfg": best[1], "test": best[2], "test_shifted": best[3]})
            print(f"seed {seed} {arm:4s} val {best[0]:.3f} test {best[2]:.3f} shifted {best[3]:.3f} {best[1]} "
                  f"({time.time() - start:.0f}s)", flush=True)
    meta = {"wall_s": round(time.time() - start, 1), "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU, 1 thread (2 cores shared with other jobs)"}
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["| arm | val acc | test acc (clean) | test acc (shifted) | per seed test (clean) |", "|---|---|---|---|---|"]
    for arm, rows in results.items():
        mean = {k: np.mean([r[k] for r in rows]) for k in ("val", "test", "test_shifted")}
        std = {k: np.std([r[k] for r in rows]) for k in ("test", "test_shifted")}
        lines.append(f"| {arm} | {mean['val']:.3f} | {mean['test']:.3f} ± {std['test']:.3f} | "
                     f"{mean['test_shifted']:.3f} ± {std['test_shifted']:.3f} | "
                     f"{' '.join(format(r['test'], '.3f') for r in rows)} |")
    (HERE / "results.md").write_text("\n".join(lines) + f"\n\n{meta}\n")
    print("\n".join(lines))
    print(meta)


if __name__ == "__main__":
    main()
