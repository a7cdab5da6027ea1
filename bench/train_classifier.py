"""Train the MNIST digit classifier behind `MnistFeatures` and ship it as a package asset.

    python bench/train_classifier.py --data mnist:data/mnist --epochs 2 --batch-size 128 \
        --out src/dibregman/assets/mnist_classifier

Writes `<out>.safetensors` (weights) and `<out>.json` (architecture, test accuracy, exact command, timing).
A few minutes on 2 CPU cores. Augmentation: random integer shifts of up to `--max-shift` pixels, so that
slightly off-centre generated digits are still read correctly.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from dibregman.checkpoint import export_safetensors
from dibregman.data import load_dataset
from dibregman.networks.classifier import ClassifierConfig, build_classifier


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift]^2, filling with background (-1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    net.eval()
    correct = sum(
        (net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist:data/mnist", help="dataset spec KIND:PATH with train and test splits")
    p.add_argument("--epochs", type=int, default=2, help="passes over the 60k training digits")
    p.add_argument("--batch-size", type=int, default=128, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (one-cycle schedule)")
    p.add_argument("--max-shift", type=int, default=2, help="augmentation: max random shift in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and augmentation")
    p.add_argument("--out", default="src/dibregman/assets/mnist_classifier", help="output path without suffix")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_dataset(args.data, "train")
    x_test, y_test = load_dataset(args.data, "test")
    config = ClassifierConfig(img_channels=x_train.shape[1], img_resolution=x_train.shape[-1])
    net = build_classifier(config)
    steps_per_epoch = len(x_train) // args.batch_size
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            xb = random_shift(x_train[idx], args.max_shift, gen)
            loss = F.cross_entropy(net(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        print(f"epoch {epoch}: test accuracy {accuracy(net, x_test, y_test):.4f}")
    train_s = time.time() - t0

    test_acc = accuracy(net, x_test, y_test)
    record = {
        "architecture": config.to_dict(),
        "test_accuracy": round(test_acc, 5),
        "num_test": len(x_test),
        "train_accuracy": round(accuracy(net, x_train, y_train), 5),
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "train_seconds": round(train_s, 1),
        "num_train_images_seen": args.epochs * steps_per_epoch * args.batch_size,
        "command": "python bench/train_classifier.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "torch_version": torch.__version__,
        "input": "float32 [N, 1, 28, 28] in [-1, 1] (uint8 / 127.5 - 1); features: 128-d post-ReLU",
    }
    path = export_safetensors(net.state_dict(), record, args.out)
    print(f"test accuracy {test_acc:.4f} after {train_s:.0f} s; wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
