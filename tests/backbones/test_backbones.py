"""Backbones: official key layout, shapes, freezing, FrozenBN, Swin attention, ImageNet weight loading."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from focus_detr.backbones import (
    Backbone,
    BackboneProtocol,
    ResNet,
    SwinTransformer,
    build_backbone,
    load_backbone_weights,
    load_detectron2_resnet_pkl,
    load_swin_imagenet,
    load_torchvision_resnet,
)
from focus_detr.backbones.swin import WindowAttention, shifted_window_mask, window_partition
from focus_detr.backbones.weights import UnsafePickleError, safe_load_pickle
from focus_detr.config import ResNetConfig, SwinConfig, get_preset
from focus_detr.layers.frozen_bn import FrozenBatchNorm2d

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_parity"


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ceil_half(n: int, times: int) -> int:
    for _ in range(times):
        n = -(-n // 2)
    return n


@pytest.fixture(scope="module")
def r50() -> ResNet:
    torch.manual_seed(0)
    return build_backbone(ResNetConfig(depth=50))


@pytest.fixture(scope="module")
def swin_t() -> SwinTransformer:
    torch.manual_seed(0)
    return build_backbone(SwinConfig())


# --------------------------------------------------------------------------------------------------
# ResNet structure


def test_r50_state_dict_matches_official_keys(r50: ResNet) -> None:
    entries = json.loads((FIXTURES / "keys.json").read_text())["keys"]
    official = [(e["key"][len("backbone."):], tuple(e["shape"])) for e in entries if e["key"].startswith("backbone.")]
    ours = [(k, tuple(v.shape)) for k, v in r50.state_dict().items()]
    assert len(official) == 265
    assert ours == official  # same names, same shapes, same order
    assert all(v.dtype == torch.float32 for v in r50.state_dict().values())


def test_parameter_counts() -> None:
    r50 = build_backbone(ResNetConfig(depth=50))
    assert n_params(r50) == 23_454_912  # FrozenBN tensors are buffers, not parameters
    assert n_params(build_backbone(ResNetConfig(depth=101))) == 42_394_816
    # Swin-T: 28,288,354 with the ImageNet head (769,000) and final norm (1,536), plus norm1..3 (2,688).
    assert n_params(build_backbone(SwinConfig())) == 27_520_506


def test_resnet_output_shapes_odd_input(r50: ResNet) -> None:
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        out = r50(x)
    assert list(out) == ["res3", "res4", "res5"] == r50.out_features
    assert r50.out_channels == {"res3": 512, "res4": 1024, "res5": 2048}
    assert r50.out_strides == {"res3": 8, "res4": 16, "res5": 32}
    for name, halvings in (("res3", 3), ("res4", 4), ("res5", 5)):
        assert out[name].shape == (2, r50.out_channels[name], ceil_half(97, halvings), ceil_half(131, halvings))
    assert isinstance(r50, Backbone) and isinstance(r50, BackboneProtocol)


def test_resnet_ceil_sizes_at_coco_resolution() -> None:
    tiny = build_backbone(get_preset("tiny").backbone)
    with torch.no_grad():
        out = tiny(torch.zeros(1, 3, 800, 1333))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(100, 167), (50, 84), (25, 42)]


def test_resnet_builds_only_needed_stages() -> None:
    m = ResNet(depth=50, out_features=("res3",), num_blocks=(1, 1, 1, 1), stem_channels=8, base_width=4)
    assert not hasattr(m, "res4") and not hasattr(m, "res5")
    assert m.out_channels == {"res3": 32}
    assert list(m(torch.randn(1, 3, 33, 33))) == ["res3"]
    with pytest.raises(ValueError):
        ResNet(depth=34)
    with pytest.raises(ValueError):
        ResNet(out_features=("res6",))
    with pytest.raises(ValueError):
        ResNet(freeze_at=6)


@pytest.mark.parametrize("norm", ["frozen_bn", "gn"])
def test_freeze_at(norm: str) -> None:
    def frozen_prefixes(freeze_at: int) -> set[str]:
        m = ResNet(num_blocks=(1, 1, 1, 1), stem_channels=16, base_width=8, freeze_at=freeze_at, norm=norm)
        return {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}

    assert frozen_prefixes(0) == set()
    assert frozen_prefixes(1) == {"stem"}
    assert frozen_prefixes(3) == {"stem", "res2", "res3"}
    assert frozen_prefixes(5) == {"stem", "res2", "res3", "res4", "res5"}


def test_official_freeze_gradients(r50: ResNet) -> None:
    assert r50.stem.conv1.weight.requires_grad is False
    out = r50(torch.randn(1, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert r50.stem.conv1.weight.grad is None
    assert r50.res2[0].conv1.weight.grad is not None and r50.res5[2].conv3.weight.grad is not None
    r50.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# FrozenBatchNorm2d


def test_frozen_bn_matches_formula_and_batch_norm() -> None:
    torch.manual_seed(0)
    bn = FrozenBatchNorm2d(6)
    bn.weight.copy_(torch.rand(6) + 0.5)
    bn.bias.copy_(torch.randn(6))
    bn.running_mean.copy_(torch.randn(6))
    bn.running_var.copy_(torch.rand(6) + 0.1)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).float()
    view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    manual = (x - view(bn.running_mean)) / torch.sqrt(view(bn.running_var) + 1e-5) * view(bn.weight) + view(bn.bias)
    reference = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=1e-5)

    no_grad_out = bn(x)  # F.batch_norm path
    torch.testing.assert_close(no_grad_out, reference, rtol=0, atol=0)
    torch.testing.assert_close(no_grad_out, manual, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    grad_out = bn(xg)  # explicit affine path
    torch.testing.assert_close(grad_out, manual, rtol=1e-5, atol=1e-5)
    grad_out.sum().backward()
    scale = bn.weight / torch.sqrt(bn.running_var + 1e-5)
    torch.testing.assert_close(xg.grad, view(scale).expand_as(x), rtol=1e-6, atol=1e-6)

    assert list(bn.parameters()) == []
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    torch.testing.assert_close(FrozenBatchNorm2d(3)(x[:, :3]), x[:, :3])  # identity at init


def test_frozen_bn_ignores_num_batches_tracked() -> None:
    bn = FrozenBatchNorm2d(4)
    sd = {"weight": torch.full((4,), 2.0), "bias": torch.ones(4), "running_mean": torch.zeros(4),
          "running_var": torch.ones(4), "num_batches_tracked": torch.tensor(7)}
    result = bn.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(bn.weight, torch.full((4,), 2.0))


# --------------------------------------------------------------------------------------------------
# torchvision / detectron2 ResNet weights


def torchvision_resnet_shapes(blocks: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """torchvision bottleneck ResNet state-dict shapes, written out from torchvision's layout."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for layer, n in enumerate(blocks, start=1):
        planes = 64 * 2 ** (layer - 1)
        for b in range(n):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def tv_to_d2_name(name: str) -> str:
    """The renaming of detectron2's tools/convert-torchvision-to-d2.py, as plain string replacements."""
    if "layer" not in name:
        name = "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def random_torchvision_r50(blocks: tuple[int, ...] = (3, 4, 6, 3)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        k: (torch.tensor(3) if k.endswith("num_batches_tracked") else torch.rand(s, generator=g) + 0.5)
        for k, s in torchvision_resnet_shapes(blocks).items()
    }


def test_torchvision_round_trip() -> None:
    tv = random_torchvision_r50()
    model = build_backbone(ResNetConfig(depth=50))
    report = load_torchvision_resnet(model, {"model": tv})
    sd = model.state_dict()
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(sd)
    assert set(report.skipped) == {"fc.weight", "fc.bias"} | {k for k in tv if k.endswith("num_batches_tracked")}
    for k, v in tv.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(sd[tv_to_d2_name(k)], v), k


def test_torchvision_missing_extra_and_misshaped_keys() -> None:
    model = ResNet(depth=50)
    tv = random_torchvision_r50()
    del tv["layer2.0.downsample.0.weight"]
    tv["layer2.9.conv1.weight"] = torch.zeros(3)  # renamed, but the model has no block 9
    tv["something.else"] = torch.zeros(1)  # no rule: reported under its own name
    report = load_torchvision_resnet(model, tv)
    assert report.missing == ["res3.0.shortcut.weight"]
    assert report.unexpected == ["res3.9.conv1.weight", "something.else"]
    assert "res3.0.shortcut.weight" in report.summary()

    fresh = ResNet(depth=50)
    before = fresh.res2[0].conv1.weight.clone()
    tv = random_torchvision_r50()
    tv["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match=r"res2\.0\.conv2\.weight.*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
        load_torchvision_resnet(fresh, tv)
    assert torch.equal(fresh.res2[0].conv1.weight, before)  # nothing loaded on error


SHORT = (1, 1, 1, 1)  # standard widths, one block per stage: keeps the pickles small


def d2_numpy_dict() -> dict[str, np.ndarray]:
    return {tv_to_d2_name(k): v.numpy() for k, v in random_torchvision_r50(SHORT).items()}


@pytest.mark.parametrize("wrapped,protocol", [(True, pickle.HIGHEST_PROTOCOL), (False, 2)])
def test_detectron2_pkl(tmp_path: Path, wrapped: bool, protocol: int) -> None:
    weights = d2_numpy_dict()  # includes stem.fc.* and num_batches_tracked, as the d2 converter writes
    obj = {"model": weights, "__author__": "torchvision", "matching_heuristics": True} if wrapped else weights
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    model = ResNet(num_blocks=SHORT)
    report = load_backbone_weights(model, path)  # dispatches on .pkl
    assert report.missing == [] and report.unexpected == []
    assert "stem.fc.weight" in report.skipped
    sd = model.state_dict()
    for k in sd:
        assert np.array_equal(sd[k].numpy(), weights[k]), k
    assert load_detectron2_resnet_pkl(ResNet(num_blocks=SHORT), path).loaded == report.loaded


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": _Evil(str(sentinel))}}))
    with pytest.raises(UnsafePickleError, match="system"):
        load_detectron2_resnet_pkl(ResNet(depth=50), path)
    assert not sentinel.exists()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        safe_load_pickle(b"cbuiltins\neval\n(S'1+1'\ntR.")
    assert safe_load_pickle(pickle.dumps({"a": np.arange(3)}))["a"].tolist() == [0, 1, 2]


def test_msra_names_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    msra = tmp_path / "R-50-msra.pkl"
    msra.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32),
                                             "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)}}))
    with pytest.raises(ValueError, match="stride_in_1x1"):
        load_backbone_weights(ResNet(depth=50), msra)
    odd = tmp_path / "weights.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, odd)
    with pytest.raises(ValueError, match="unrecognised backbone weight format"):
        load_backbone_weights(ResNet(depth=50), odd)
    with pytest.raises(ValueError, match="unknown weight file type"):
        load_backbone_weights(ResNet(depth=50), tmp_path / "weights.npz")


def test_load_backbone_weights_dispatch_pth(tmp_path: Path) -> None:
    tv = random_torchvision_r50(SHORT)
    path = tmp_path / "resnet50.pth"
    torch.save(tv, path)
    model = ResNet(num_blocks=SHORT)
    report = load_backbone_weights(model, path)
    assert report.source == "torchvision ResNet" and not report.missing
    assert torch.equal(model.res4[0].conv3.norm.running_var, tv["layer3.0.bn3.running_var"])
    with pytest.raises(ValueError, match="SwinTransformer backbone"):
        load_backbone_weights(model, _swin_imagenet_file(tmp_path))


# --------------------------------------------------------------------------------------------------
# Swin


def test_swin_forward_shapes_and_gradients(swin_t: SwinTransformer) -> None:
    assert swin_t.out_features == ["p1", "p2", "p3"]
    assert swin_t.out_channels == {"p1": 192, "p2": 384, "p3": 768}
    assert swin_t.out_strides == {"p1": 8, "p2": 16, "p3": 32}
    out = swin_t(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p1": (1, 192, 8, 12), "p2": (1, 384, 4, 6), "p3": (1, 768, 2, 3)}
    sum((v ** 2).mean() for v in out.values()).backward()
    no_grad = [n for n, p in swin_t.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    swin_t.zero_grad(set_to_none=True)
    # Sizes that are neither multiples of the patch nor of the window: every step rounds up.
    with torch.no_grad():
        odd = swin_t(torch.randn(2, 3, 70, 101))
    for i, name in enumerate(["p1", "p2", "p3"], start=1):
        assert odd[name].shape[-2:] == (ceil_half(math.ceil(70 / 4), i), ceil_half(math.ceil(101 / 4), i))


def test_swin_drop_path_only_in_training() -> None:
    torch.manual_seed(0)
    m = SwinTransformer(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, drop_path_rate=0.5,
                        out_indices=(0, 1))
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        a, b = m(x)["p1"], m(x)["p1"]
    assert torch.equal(a, b)
    m.train()
    with torch.no_grad():
        c, d = m(x)["p1"], m(x)["p1"]
    assert not torch.equal(c, d)


def test_shifted_window_attention_semantics() -> None:
    """Window attention with the shift mask == explicit attention within (window, region) groups."""
    torch.manual_seed(0)
    ws, shift, heads, c = 4, 2, 2, 8
    hp, wp = 8, 12
    attn = WindowAttention(c, ws, heads)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, hp, wp, c)
    mask = shifted_window_mask(hp - 1, wp - 3, ws, shift, x.device)  # sizes padded up to (8, 12)
    got = attn(window_partition(x, ws).reshape(-1, ws * ws, c), mask)

    def band(i: int, size: int) -> int:
        return 0 if i < size - ws else (1 if i < size - shift else 2)

    n_w = wp // ws
    scale = (c // heads) ** -0.5
    for bi in range(2):
        for wi in range(hp // ws):
            for wj in range(n_w):
                coords = [(wi * ws + r, wj * ws + s) for r in range(ws) for s in range(ws)]
                tokens = torch.stack([x[bi, y, z] for y, z in coords])  # [N, C]
                q, k, v = attn.qkv(tokens).view(len(coords), 3, heads, c // heads).unbind(1)
                outs = []
                for h in range(heads):
                    logits = (q[:, h] * scale) @ k[:, h].T
                    for p, (py, px) in enumerate(coords):
                        for o, (qy, qx) in enumerate(coords):
                            row = (py - qy + ws - 1) * (2 * ws - 1) + (px - qx + ws - 1)
                            logits[p, o] += attn.relative_position_bias_table[row, h]
                            if (band(py, hp), band(px, wp)) != (band(qy, hp), band(qx, wp)):
                                logits[p, o] = float("-inf")
                    outs.append(logits.softmax(-1) @ v[:, h])
                expected = attn.proj(torch.cat(outs, dim=-1))
                torch.testing.assert_close(got[bi * (hp // ws) * n_w + wi * n_w + wj], expected,
                                           rtol=1e-5, atol=1e-5)


# A narrow Swin with the Swin-T layout: loading logic does not depend on the width.
SMALL_SWIN = SwinConfig(embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), window_size=7)


def _swin_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """What an official Swin ImageNet .pth holds: our names minus norm{i}, plus head / norm / attn_mask."""
    torch.manual_seed(3)
    src = build_backbone(SMALL_SWIN)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("norm1.", "norm2.", "norm3."))}
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    sd.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128),
               "head.weight": torch.zeros(1000, 128), "head.bias": torch.zeros(1000)})
    return sd


def _swin_imagenet_file(tmp_path: Path) -> Path:
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": _swin_imagenet_state_dict()}, path)
    return path


def test_swin_imagenet_loading(tmp_path: Path) -> None:
    src = _swin_imagenet_state_dict()
    model = build_backbone(SMALL_SWIN)
    report = load_backbone_weights(model, _swin_imagenet_file(tmp_path))
    assert report.source == "Swin ImageNet"
    assert report.missing == ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias"]
    assert report.unexpected == []
    dropped = {"head.weight", "head.bias", "norm.weight", "norm.bias", "layers.0.blocks.1.attn_mask"}
    assert dropped <= set(report.skipped)
    sd = model.state_dict()
    assert sorted(report.loaded) == sorted(k for k in sd if k in src and "relative_position_index" not in k)
    for k, v in src.items():
        if k in sd:
            assert torch.equal(sd[k], v), k
    assert torch.equal(model.norm3.weight, torch.ones(128))
    # A window-12 model cannot take window-7 relative-position tables.
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        load_swin_imagenet(build_backbone(SwinConfig(embed_dim=16, num_heads=(1, 2, 4, 8), window_size=12)), src)


# --------------------------------------------------------------------------------------------------
# Tiny preset


def test_tiny_preset_forward_backward() -> None:
    torch.manual_seed(0)
    cfg = get_preset("tiny").backbone
    model = build_backbone(cfg)
    assert isinstance(model, ResNet)
    assert model.out_channels == {"res3": 64, "res4": 128, "res5": 256}
    out = model(torch.randn(2, 3, 96, 80))
    assert [tuple(v.shape) for v in out.values()] == [(2, 64, 12, 10), (2, 128, 6, 5), (2, 256, 3, 3)]
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(isinstance(m, torch.nn.GroupNorm) for n, m in model.named_modules() if n.endswith(".norm"))


def test_build_backbone_rejects_other_configs() -> None:
    with pytest.raises(TypeError):
        build_backbone(get_preset("tiny"))  # a FocusDETRConfig, not a backbone config
