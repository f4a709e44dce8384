"""How much does per-epoch OOD evaluation add to a training epoch? (issue 18's target: <= 15% on the quickstart)

Builds the quickstart's model and data through the real CLI (no run), times one training epoch (with its
ID validation, as in the quickstart) without the OODEvaluation callback, then times one per-epoch
evaluation (`evaluate_model` with the config's `OODEvaluation.epoch_max_samples`, exactly what the
callback runs after each epoch), and prints both and their ratio (steady state: the second evaluation),
measured in the same process; the full-set evaluation that ends `fit` is timed and printed separately:

    python tools/bench_eval_overhead.py [--config configs/quickstart.yaml] [--max-samples 500]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl

from robustft.callbacks import OODEvaluation
from robustft.cli import main
from robustft.evaluation.engine import evaluate_model


def run(config: str, override: int | None = None) -> None:
    cli = main(["--config", config], run=False)
    model, datamodule = cli.model, cli.datamodule
    callback = next((c for c in cli.trainer.callbacks if isinstance(c, OODEvaluation)), None)
    max_samples = callback.epoch_max_samples if callback is not None else None
    max_samples = override if override is not None else max_samples
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluate_model(model, datamodule, max_samples=max_samples)  # also builds the cached evaluation tensors
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = evaluate_model(model, datamodule, max_samples=max_samples)  # what every later epoch pays
    eval_seconds = time.perf_counter() - started
    started = time.perf_counter()
    full = evaluate_model(model, datamodule)  # once, at the end of fit (and at test)
    full_seconds = time.perf_counter() - started
    n_eval = result.report["id"]["n"] + sum(next(iter(s.values()))["n"] for s in result.report["ood"].values())
    print(f"training epoch: {train_seconds:.1f} s ({len(datamodule.train_dataset())} images)")
    print(f"first OOD evaluation (builds the eval cache): {first_seconds:.1f} s")
    n_full = full.report["id"]["n"] + sum(next(iter(s.values()))["n"] for s in full.report["ood"].values())
    print(f"per-epoch OOD evaluation: {eval_seconds:.1f} s ({n_eval} images, at most {max_samples} per set, "
          f"scores {model.score_names})")
    print(f"full-set evaluation at the end of fit: {full_seconds:.1f} s ({n_full} images)")
    print(f"per-epoch evaluation / epoch = {eval_seconds / train_seconds:.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="per-set sample cap of the per-epoch evaluation (default: the config's epoch_max_samples)")
    options = parser.parse_args()
    run(options.config, options.max_samples)
