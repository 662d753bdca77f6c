"""totalVI training throughput, run inside the peer venv (bench/peers/mvae_totalvi_install.sh).

    python mvae_totalvi_runner.py DATA.h5ad --epochs 3 --threads 2 [--batch-size 256]

Reads ``DATA.h5ad`` (raw RNA counts in ``X``, protein counts in ``obsm["protein_counts"]``),
sets up ``scvi.model.TOTALVI`` at its defaults (``TOTALVI(adata)``: n_latent 20, 2-layer encoder,
NB genes, protein background/foreground mixture; ``train``: lr 4e-3, batch 256, 90/10 split,
validation every epoch for reduce-lr-on-plateau, early stopping) and trains ``--epochs`` epochs
on the CPU with ``torch.set_num_threads(threads)``. A Lightning callback stamps the start of
every training epoch and the end of the last; the reply (one JSON line on stdout) gives the
epoch times (each includes that epoch's validation pass, as in totalVI's default training),
the number of training cells and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()

    import importlib.metadata as md
    import warnings

    import anndata as ad
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import scvi
    from lightning.pytorch.callbacks import Callback

    stamps: list[float] = []

    class Stamp(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            stamps.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            stamps.append(time.perf_counter())

    adata = ad.read_h5ad(args.data)
    scvi.settings.seed = 0
    t0 = time.perf_counter()
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_counts")
    model = scvi.model.TOTALVI(adata)
    setup_s = time.perf_counter() - t0
    kw = {} if args.batch_size is None else {"batch_size": args.batch_size}
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[Stamp()],
                enable_progress_bar=False, **kw)
    train_s = time.perf_counter() - t0
    epochs = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)]
    n_train = len(model.train_indices)
    print(json.dumps({
        "ok": True, "epoch_s": epochs, "n_train": n_train, "n_cells": adata.n_obs,
        "n_genes": adata.n_vars, "n_proteins": int(adata.obsm["protein_counts"].shape[1]),
        "setup_s": setup_s, "train_s": train_s, "batch_size": args.batch_size or 256,
        "scvi_tools": md.version("scvi-tools"), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
