"""What the rest of the model may assume about a backbone.

A backbone maps a normalised image batch ``[B, 3, H, W]`` to a dict of feature maps, fine to coarse, and
says how many channels and what stride each map has, so the neck can size itself without knowing which
backbone it sits on (detectron2's ``Backbone.output_shape()`` idea, as plain attributes).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class BackboneProtocol(Protocol):
    """Structural type of a backbone (a test double need not inherit from :class:`Backbone`).

    out_features: feature names, fine to coarse (e.g. ``["res3", "res4", "res5"]``).
    out_channels: channels of each feature.
    out_strides:  stride of each feature with respect to the input image.
    forward:      ``x [B, 3, H, W]`` -> ``{name: [B, out_channels[name], ceil(H / s), ceil(W / s)]}``.
    """

    out_features: list[str]
    out_channels: dict[str, int]
    out_strides: dict[str, int]

    def forward(self, x: Tensor) -> dict[str, Tensor]: ...

    def __call__(self, x: Tensor) -> dict[str, Tensor]: ...


class Backbone(nn.Module):
    """Base class of the backbones in this package: holds the three output descriptors.

    Subclasses call :meth:`_set_outputs` in their constructor and implement ``forward``.
    """

    out_features: list[str]
    out_channels: dict[str, int]
    out_strides: dict[str, int]

    def _set_outputs(self, names: list[str], channels: dict[str, int], strides: dict[str, int]) -> None:
        # Keep the dicts restricted to the requested outputs and ordered fine to coarse.
        names = sorted(names, key=lambda n: strides[n])
        self.out_features = names
        self.out_channels = {n: channels[n] for n in names}
        self.out_strides = {n: strides[n] for n in names}

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
