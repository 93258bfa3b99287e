"""Zero-shot scale extrapolation on the synthetic organisation task: train at 256 tokens, test at 256 and 1024.

Protocol (the paper's, on synthetic data): models are trained only on 256×256 images (256 tokens of 16×16 px) with
flips/rotations and stain jitter; the epoch is chosen on held-out 256×256 images; the test fields are 512×512 and
are scored twice with the same weights: on their 256×256 centre crop (256 tokens) and on the whole field (1024
tokens, a size never seen in training). The label is the spatial organisation of two textures over a lattice of
16-px cells aligned with the patch grid (see ``dfmamba_st.pathology.synthetic``), so it means the same thing for
the crop and the field: the field shows more of the same organisation (a larger field of view, not an upsampled
image). Training images are drawn at 256×256 directly: every generated image holds exactly half of each texture,
and a crop of a larger field would not, which would leak the class to a texture-counting model; the centre crop of
a test field starts at a multiple of 16 px, so it stays aligned with the lattice.

Models, same width, same data, same schedule, one run:

* DF-Mamba (``--depth`` K, default 4) — the model of the paper;
* flat Mamba (DF-Mamba with depth 0: one Mamba block over the Hilbert sequence);
* patch-MLP — each 16×16 patch embedded and passed through an MLP on its own, mean-pooled: a model that sees
  local texture only, to measure how much of the task local texture solves (the design target is 25 %, chance).

Run from the repository root::

    PYTHONPATH=. python benchmarks/pathology_scale.py            # default, about 15 min on 1 CPU thread
    PYTHONPATH=. python benchmarks/pathology_scale.py --quick    # plumbing only, about 15 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dfmamba_st import set_threads  # noqa: E402
from dfmamba_st.core import available_backends, seed_everything  # noqa: E402
from dfmamba_st.pathology import (  # noqa: E402
    DFMambaClassifier,
    PatchEmbedding,
    count_parameters,
    evaluate_resolutions,
    make_synthetic_dataset,
    train_classifier,
)


class PatchMLP(nn.Module):
    """Local-texture baseline: per-patch MLP, no interaction between patches, mean pool, linear head."""

    def __init__(self, n_classes: int, d_model: int, embed_scale: float = 0.02) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.patch_size = 16
        self.embed = PatchEmbedding(d_model, init_scale=embed_scale)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward_with_aux(self, images: torch.Tensor):
        h = self.embed((images - 0.5) / 0.25)
        h = self.norm(h + self.mlp(h))
        return self.head(h.mean(1)), type("Aux", (), {"loss": images.new_zeros(())})()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(images)[0]

    def n_parameters(self) -> int:
        return count_parameters(self)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)  # --quick reads full names
    p.add_argument("--quick", action="store_true", help="CI scale: tiny model, few images, 2 epochs")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="DF-Mamba fractal depth K")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--train-images", type=int, default=128, help="256-px training images per class")
    p.add_argument("--val-images", type=int, default=25, help="256-px validation images per class")
    p.add_argument("--test-fields", type=int, default=50, help="512-px test fields per class")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--field", type=int, default=512)
    p.add_argument("--cell", type=int, default=16, help="lattice spacing of the synthetic organisation (px)")
    p.add_argument("--models", default="dfmamba,flat,patch", help="comma list of dfmamba, flat, patch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:  # the CI scale, for the options not given on the line
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv or sys.argv[1:] if a.startswith("--")}
        quick = dict(d_model=16, d_state=4, depth=min(args.depth, 3), train_images=8, val_images=2, test_fields=4)
        for name, value in {**quick, "epochs": 2, "field": 512}.items():
            if name not in given:
                setattr(args, name, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    numba_threads = set_threads(args.threads)["numba"]  # capped at NUMBA_NUM_THREADS: the count printed below
    seed_everything(args.seed)
    t0 = time.perf_counter()
    train = make_synthetic_dataset(args.train_images, args.crop, seed=args.seed, cell=args.cell)
    val = make_synthetic_dataset(args.val_images, args.crop, seed=args.seed + 1, cell=args.cell)
    test = make_synthetic_dataset(args.test_fields, args.field, seed=args.seed + 2, cell=args.cell)
    n_tok_crop = (args.crop // 16) ** 2
    n_tok_field = (args.field // 16) ** 2
    print(
        f"synthetic organisation task: {len(train[1])} training images {args.crop}px, {len(val[1])} validation "
        f"images {args.crop}px, {len(test[1])} test fields {args.field}px; data {time.perf_counter() - t0:.0f} s; "
        f"scan backends {available_backends()}; torch threads {torch.get_num_threads()}, "
        f"numba threads {numba_threads}",
        flush=True,
    )
    builders = {
        "dfmamba": (
            f"DF-Mamba (K={args.depth})",
            lambda: DFMambaClassifier(4, d_model=args.d_model, depth=args.depth, d_state=args.d_state),
        ),
        "flat": ("flat Mamba (K=0)", lambda: DFMambaClassifier(4, d_model=args.d_model, depth=0, d_state=args.d_state)),
        "patch": ("patch-MLP (local only)", lambda: PatchMLP(4, args.d_model)),
    }
    rows = []
    for key in [k.strip() for k in args.models.split(",") if k.strip()]:
        name, build = builders[key]
        seed_everything(args.seed)
        model = build()
        start = time.perf_counter()
        result = train_classifier(
            model,
            train,
            val=val,
            crop=args.crop,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            patience=None,
            seed=args.seed,
            progress=False,
            description=key,
        )
        seconds = time.perf_counter() - start
        res = evaluate_resolutions(model, test[0], test[1], crops=(args.crop, None), batch_size=args.batch_size)
        last = result.history[-1]
        row = {
            "model": name,
            "params": model.n_parameters(),
            "train_s": round(seconds, 1),
            "best_epoch": result.best_epoch,
            "final_train_loss": round(last["train_loss"], 4),
            "final_train_acc": round(last.get("acc", float("nan")), 3),
            f"acc_{n_tok_crop}": res[n_tok_crop]["accuracy"],
            f"acc_{n_tok_field}": res[n_tok_field]["accuracy"],
            "confusion_field": res[n_tok_field]["confusion"].tolist(),
        }
        rows.append(row)
        print(
            f"  {name}: {seconds:.0f} s, best epoch {result.best_epoch + 1} (counted from 1), val loss per epoch "
            f"{[round(h['val_loss'], 3) for h in result.history]}, "
            f"acc {row[f'acc_{n_tok_crop}']:.3f} @ {n_tok_crop} / {row[f'acc_{n_tok_field}']:.3f} @ {n_tok_field}",
            flush=True,
        )

    print()
    print(
        f"train {args.crop}px images ({n_tok_crop} tokens) -> test {args.crop}px centre crop and {args.field}px "
        f"field ({n_tok_field} tokens, zero-shot); d_model {args.d_model}, {args.epochs} epochs, "
        f"{len(test[1])} test fields, chance 0.25"
    )
    header = f"{'model':<24} {'params':>9} {'train s':>8} {f'acc@{n_tok_crop}':>9} {f'acc@{n_tok_field}':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<24} {r['params']:>9,} {r['train_s']:>8.0f} {r[f'acc_{n_tok_crop}']:>9.3f} "
            f"{r[f'acc_{n_tok_field}']:>10.3f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
