"""Preprocessing as data: one definition per dataset, stored in every ONNX file the project writes.

A :class:`Preprocess` turns raw uint8 pixels into the model's float input.  Training, calibration and
evaluation all call the same object, and export writes it to ``mnv3_compress.preprocess`` so that a deployed
model says how to feed it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported when pixels are processed, so reading a model's metadata stays light
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """Pixels in [0, 255] -> (resize shorter side to ``resize``, center crop | resize) -> /255 -> (x-mean)/std."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grayscale_to_rgb: bool = False
    interpolation: str = "bilinear"
    resize: int | None = None  # shorter side before the center crop; None: resize straight to input_size

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be [H, W] with positive sides, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")

    # -- serialization (ONNX metadata_props) --------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        d = json.loads(text)
        return cls(input_size=tuple(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   grayscale_to_rgb=bool(d.get("grayscale_to_rgb", False)),
                   interpolation=d.get("interpolation", "bilinear"), resize=d.get("resize"))

    # -- application --------------------------------------------------------------------------------
    def __call__(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 pixels, ``[N, H, W]`` (grayscale) or ``[N, H, W, C]`` (same size within the batch) -> ``[N, 3, h, w]`` float32."""
        import torch

        x = torch.as_tensor(pixels)
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        if x.ndim != 4:
            raise ValueError(f"expected pixels [N, H, W] or [N, H, W, C], got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[1] == 1 and self.grayscale_to_rgb:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:
            x = x[:, :3]
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 channels after conversion, got {x.shape[1]}")
        x = self._resize_crop(x)
        x = x.clamp_(0, 255) / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional as F

        th, tw = self.input_size
        h, w = x.shape[-2:]
        kw = dict(mode=self.interpolation)
        if self.interpolation != "nearest":
            kw.update(align_corners=False, antialias=True)
        if self.resize is None:
            return x if (h, w) == (th, tw) else F.interpolate(x, size=(th, tw), **kw)
        # torchvision Resize(int): the shorter side becomes ``resize``, keeping the aspect ratio
        if h <= w:
            nh, nw = self.resize, int(self.resize * w / h)
        else:
            nh, nw = int(self.resize * h / w), self.resize
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), **kw)
        top = int(round((nh - th) / 2.0))
        left = int(round((nw - tw) / 2.0))
        if top < 0 or left < 0:
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.input_size}")
        return x[..., top:top + th, left:left + tw]


def imagenet_preprocess(input_size: int = 224) -> Preprocess:
    """ImageNet's evaluation transform, as torchvision's weights define it: resize the shorter side to
    ``input_size / 0.875`` (256 for 224), center crop ``input_size``, ImageNet mean / std."""
    return Preprocess((input_size, input_size), IMAGENET_MEAN, IMAGENET_STD, grayscale_to_rgb=False,
                      interpolation="bilinear", resize=int(round(input_size / 0.875)))


def at_input_size(pre: Preprocess, input_size: int) -> Preprocess:
    """``pre`` for another input side: a resize-then-crop keeps its crop ratio."""
    if tuple(pre.input_size) == (input_size, input_size):
        return pre
    resize = None if pre.resize is None else int(round(input_size * pre.resize / pre.input_size[0]))
    return dataclasses.replace(pre, input_size=(input_size, input_size), resize=resize)
