"""The architecture zoo (torchvision and timm) in medscalpel's :class:`MedClassifier` layout.

Torchvision models are used where the field's checkpoints and tools expect their layout
(DenseNet121 as in CheXNet, ResNet and VGG, which zennit's canonizers know); timm provides the
compact and transformer models. Every entry takes ``num_classes``, ``in_chans`` (1 or 3) and
``img_size``; tiny variants exist for tests and quick runs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models import densenet as tv_densenet
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from medscalpel.errors import ModelError
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.ofa_subnet import DEFAULT_BLOCKS, build_ofa_subnet
from medscalpel.registry import Registry
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

ARCHS: Registry[MedClassifier] = Registry("architecture")


def _adapt_first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    if conv.in_channels == in_chans:
        return conv
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        if in_chans == 1:  # grey: sum the RGB filters (keeps pretrained responses to grey input)
            new.weight.copy_(conv.weight.sum(1, keepdim=True))
        else:
            new.weight.copy_(conv.weight.mean(1, keepdim=True).repeat(1, in_chans, 1, 1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _tv_weights(enum_cls, pretrained: bool):
    if not pretrained:
        return None
    return enum_cls.DEFAULT


def _load_pretrained(builder, weights, **kw):
    try:
        return builder(weights=weights, **kw)
    except (OSError, RuntimeError, ValueError) as exc:  # no network, bad cache
        if weights is None:
            raise
        raise ModelError(
            f"Could not fetch pretrained weights {weights}: {exc}. This machine may have no "
            "internet access: train from scratch (pretrained=False) or load a local checkpoint "
            "with 'medscalpel models import'."
        ) from exc


# ----------------------------------------------------------------------------- DenseNet
def _densenet(tv: tv_densenet.DenseNet, num_classes: int, in_chans: int, arch: str,
              arch_kwargs: dict[str, Any]) -> MedClassifier:
    tv.features.conv0 = _adapt_first_conv(tv.features.conv0, in_chans)
    backbone = nn.Sequential(OrderedDict(
        features=tv.features,            # ends with norm5 (BN after the last concatenation)
        relu=nn.ReLU(inplace=False),     # the CAM target: post-ReLU last feature map
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
    ))
    clf = nn.Linear(tv.classifier.in_features, num_classes)
    return MedClassifier(backbone, clf, arch, cam_layer="backbone.relu", arch_kwargs=arch_kwargs)


@ARCHS.register("densenet121", help="DenseNet121 in the CheXNet layout (7.0M params at 14 classes)")
def densenet121(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
                pretrained: bool = False, memory_efficient: bool = False) -> MedClassifier:
    tv = _load_pretrained(tv_densenet.densenet121,
                          _tv_weights(tv_densenet.DenseNet121_Weights, pretrained),
                          memory_efficient=memory_efficient)
    return _densenet(tv, num_classes, in_chans, "densenet121",
                     {"memory_efficient": memory_efficient})


@ARCHS.register("densenet_tiny", help="A tiny DenseNet (same concatenations, 4 blocks of 2 layers)")
def densenet_tiny(num_classes: int = 14, in_chans: int = 1, img_size: int = 64,
                  pretrained: bool = False, growth_rate: int = 8,
                  block_config: tuple[int, ...] = (2, 2, 2, 2), num_init_features: int = 16,
                  bn_size: int = 2) -> MedClassifier:
    if pretrained:
        raise ModelError("densenet_tiny has no pretrained weights; use pretrained=False.")
    tv = tv_densenet.DenseNet(growth_rate=growth_rate, block_config=tuple(block_config),
                              num_init_features=num_init_features, bn_size=bn_size)
    kw = {"growth_rate": growth_rate, "block_config": list(block_config),
          "num_init_features": num_init_features, "bn_size": bn_size}
    return _densenet(tv, num_classes, in_chans, "densenet_tiny", kw)


@ARCHS.register("densenet_small", help="A small DenseNet-BC (growth 12, blocks 3-6-12-8): "
                                        "CheXNet's concatenations at CPU-friendly cost")
def densenet_small(num_classes: int = 14, in_chans: int = 1, img_size: int = 64,
                   pretrained: bool = False) -> MedClassifier:
    if pretrained:
        raise ModelError("densenet_small has no pretrained weights; use pretrained=False.")
    tv = tv_densenet.DenseNet(growth_rate=12, block_config=(3, 6, 12, 8), num_init_features=24,
                              bn_size=4)
    return _densenet(tv, num_classes, in_chans, "densenet_small", {})


# ----------------------------------------------------------------------------- ResNet
def _resnet_backbone(tv: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=tv.conv1, bn1=tv.bn1, relu=tv.relu, maxpool=tv.maxpool,
        layer1=tv.layer1, layer2=tv.layer2, layer3=tv.layer3, layer4=tv.layer4,
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
    ))


def _resnet(builder, weights_enum, arch: str, num_classes: int, in_chans: int,
            pretrained: bool) -> MedClassifier:
    tv = _load_pretrained(builder, _tv_weights(weights_enum, pretrained))
    tv.conv1 = _adapt_first_conv(tv.conv1, in_chans)
    clf = nn.Linear(tv.fc.in_features, num_classes)
    return MedClassifier(_resnet_backbone(tv), clf, arch, cam_layer="backbone.layer4")


@ARCHS.register("resnet50", help="ResNet50 (torchvision layout), PruneCXR's model")
def resnet50(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
             pretrained: bool = False) -> MedClassifier:
    return _resnet(tv_resnet.resnet50, tv_resnet.ResNet50_Weights, "resnet50", num_classes,
                   in_chans, pretrained)


@ARCHS.register("resnet18", help="ResNet18 (torchvision layout)")
def resnet18(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
             pretrained: bool = False) -> MedClassifier:
    return _resnet(tv_resnet.resnet18, tv_resnet.ResNet18_Weights, "resnet18", num_classes,
                   in_chans, pretrained)


@ARCHS.register("resnet_tiny", help="A tiny ResNet of torchvision BasicBlocks (residual additions)")
def resnet_tiny(num_classes: int = 14, in_chans: int = 1, img_size: int = 64,
                pretrained: bool = False, widths: tuple[int, ...] = (8, 16, 32, 64)) -> MedClassifier:
    if pretrained:
        raise ModelError("resnet_tiny has no pretrained weights; use pretrained=False.")
    widths = tuple(int(w) for w in widths)
    layers: list[nn.Module] = []
    inplanes = widths[0]
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != w:
            down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride, bias=False), nn.BatchNorm2d(w))
        layers.append(nn.Sequential(tv_resnet.BasicBlock(inplanes, w, stride, down)))
        inplanes = w
    backbone = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), bn1=nn.BatchNorm2d(widths[0]),
        relu=nn.ReLU(inplace=True), maxpool=nn.MaxPool2d(2),
        layer1=layers[0], layer2=layers[1], layer3=layers[2], layer4=layers[3],
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
    ))
    return MedClassifier(backbone, nn.Linear(inplanes, num_classes), "resnet_tiny",
                         cam_layer="backbone.layer4", arch_kwargs={"widths": list(widths)})


# ----------------------------------------------------------------------------- VGG
@ARCHS.register("vgg19_bn", help="VGG19 with batch norm (torchvision layout), seed 004's teacher")
def vgg19_bn(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
             pretrained: bool = False) -> MedClassifier:
    tv = _load_pretrained(tv_vgg.vgg19_bn, _tv_weights(tv_vgg.VGG19_BN_Weights, pretrained))
    tv.features[0] = _adapt_first_conv(tv.features[0], in_chans)
    backbone = nn.Sequential(OrderedDict(
        features=tv.features, avgpool=tv.avgpool, flatten=nn.Flatten(1),
        head=nn.Sequential(*list(tv.classifier.children())[:6]),
    ))
    # CAM target: the last ReLU of the feature extractor (before the final max-pool)
    last_relu = max(i for i, m in enumerate(tv.features) if isinstance(m, nn.ReLU))
    for m in tv.features:
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return MedClassifier(backbone, nn.Linear(4096, num_classes), "vgg19_bn",
                         cam_layer=f"backbone.features.{last_relu}")


@ARCHS.register("vgg_tiny", help="A compact VGG-style CNN (conv-BN-ReLU stacks, GAP head)")
def vgg_tiny(num_classes: int = 14, in_chans: int = 1, img_size: int = 64,
             pretrained: bool = False, cfg: tuple = (16, "M", 32, "M", 64, 64, "M", 96)) -> MedClassifier:
    if pretrained:
        raise ModelError("vgg_tiny has no pretrained weights; use pretrained=False.")
    cfg = [c if c == "M" else int(c) for c in cfg]
    layers: list[nn.Module] = []
    c_in = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=False)]
            c_in = v
    features = nn.Sequential(*layers)
    last_relu = max(i for i, m in enumerate(features) if isinstance(m, nn.ReLU))
    backbone = nn.Sequential(OrderedDict(features=features, pool=nn.AdaptiveAvgPool2d(1),
                                         flatten=nn.Flatten(1)))
    return MedClassifier(backbone, nn.Linear(c_in, num_classes), "vgg_tiny",
                         cam_layer=f"backbone.features.{last_relu}", arch_kwargs={"cfg": cfg})


# ----------------------------------------------------------------------------- timm models
class TimmBackbone(nn.Module):
    """A timm model with its classifier removed: ``forward`` returns pre-logit features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _vit_reshape(tokens: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    n, t, c = tokens.shape
    side = int(round((t - prefix) ** 0.5))
    return tokens[:, prefix:, :].reshape(n, side, side, c).permute(0, 3, 1, 2)


class _ViTReshape:
    """Picklable token -> map reshape for ViT CAMs."""

    def __init__(self, prefix: int):
        self.prefix = prefix

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return _vit_reshape(tokens, self.prefix)


def _timm(name: str, arch: str, num_classes: int, in_chans: int, img_size: int, pretrained: bool,
          cam_layer: str, token_model: bool = False, **kw: Any) -> MedClassifier:
    import timm  # imported on first use: slow to import, and only the timm archs need it

    if token_model or arch.startswith("visformer"):
        kw["img_size"] = img_size
    try:
        m = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kw)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise ModelError(f"Could not fetch pretrained timm weights for {name}: {exc}. Train from "
                         "scratch or import a local checkpoint.") from exc
    m.eval()
    with torch.no_grad():
        dim = m(torch.zeros(1, in_chans, img_size, img_size)).shape[1]
    reshape = _ViTReshape(getattr(m, "num_prefix_tokens", 1)) if token_model else None
    return MedClassifier(TimmBackbone(m), nn.Linear(dim, num_classes), arch, cam_layer=cam_layer,
                         cam_reshape=reshape, arch_kwargs={k: v for k, v in kw.items()
                                                           if k != "img_size"})


@ARCHS.register("mobilenetv3_large_100", help="MobileNetV3-Large (timm), compact student")
def mobilenetv3_large_100(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
                          pretrained: bool = False) -> MedClassifier:
    return _timm("mobilenetv3_large_100", "mobilenetv3_large_100", num_classes, in_chans,
                 img_size, pretrained, cam_layer="backbone.model.blocks")


@ARCHS.register("mobilenetv3_small_100", help="MobileNetV3-Small (timm), compact student")
def mobilenetv3_small_100(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
                          pretrained: bool = False) -> MedClassifier:
    return _timm("mobilenetv3_small_100", "mobilenetv3_small_100", num_classes, in_chans,
                 img_size, pretrained, cam_layer="backbone.model.blocks")


@ARCHS.register("efficientnet_b0", help="EfficientNet-B0 (timm)")
def efficientnet_b0(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
                    pretrained: bool = False) -> MedClassifier:
    return _timm("efficientnet_b0", "efficientnet_b0", num_classes, in_chans, img_size,
                 pretrained, cam_layer="backbone.model.bn2")


@ARCHS.register("deit_tiny", help="DeiT-Tiny vision transformer (timm), patch 16")
def deit_tiny(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
              pretrained: bool = False) -> MedClassifier:
    return _timm("deit_tiny_patch16_224", "deit_tiny", num_classes, in_chans, img_size,
                 pretrained, cam_layer="backbone.model.blocks.11.norm1", token_model=True)


@ARCHS.register("visformer_small", help="Visformer-S (timm), seed 004's transformer teacher")
def visformer_small(num_classes: int = 14, in_chans: int = 1, img_size: int = 224,
                    pretrained: bool = False) -> MedClassifier:
    return _timm("visformer_small", "visformer_small", num_classes, in_chans, img_size,
                 pretrained, cam_layer="backbone.model.stage3")


@ARCHS.register("vit_test", help="A 2-block ViT for tests (patch 8, width 32)")
def vit_test(num_classes: int = 14, in_chans: int = 1, img_size: int = 32,
             pretrained: bool = False) -> MedClassifier:
    return _timm("vit_tiny_patch16_224", "vit_test", num_classes, in_chans, img_size, pretrained,
                 cam_layer="backbone.model.blocks.1.norm1", token_model=True, patch_size=8,
                 embed_dim=32, depth=2, num_heads=2)


@ARCHS.register("ofa_subnet", help="A once-for-all subnet extracted from an elastic supernet "
                                   "('compress distill --student ofa'), rebuilt from arch_kwargs")
def ofa_subnet(num_classes: int = 14, in_chans: int = 1, img_size: int = 64,
               pretrained: bool = False, stem_width: int = 16,
               blocks: list[dict[str, Any]] | None = None, head_width: int = 64,
               stem_stride: int = 2) -> MedClassifier:
    if pretrained:
        raise ModelError("ofa_subnet has no pretrained weights: its weights come from a trained "
                         "supernet (medscalpel.compress.ofa).")
    return build_ofa_subnet(num_classes, in_chans, stem_width,
                            blocks if blocks else [dict(b) for b in DEFAULT_BLOCKS], head_width,
                            stem_stride)


def create_model(arch: str, num_classes: int, in_chans: int = 1, img_size: int = 224,
                 pretrained: bool = False, **kwargs: Any) -> MedClassifier:
    """Build a zoo architecture as a :class:`MedClassifier`.

    Example:
        >>> m = create_model("densenet_tiny", num_classes=3, in_chans=1, img_size=32)
        >>> m(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 3])
    """
    check_range(num_classes, "num_classes", "create_model", 1, integer=True)
    if in_chans not in (1, 3):
        raise ModelError(f"The 'in_chans' parameter of create_model must be 1 or 3. Got "
                         f"{in_chans!r} instead.")
    model = ARCHS.get(arch)(num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                            pretrained=pretrained, **kwargs)
    model.arch_kwargs = {**model.arch_kwargs, **{k: v for k, v in kwargs.items()}}
    model.arch_kwargs.update({"in_chans": in_chans, "img_size": img_size})
    return model


def list_models() -> dict[str, str]:
    return ARCHS.describe()
