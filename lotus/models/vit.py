"""Small ViTs for small images, registered with timm so ``timm.create_model`` builds them.

They are plain timm ``VisionTransformer`` models (same code path as vit_base_patch16_224), sized for
8-32 px inputs, so every Lotus feature that works on them works on any timm ViT.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["lotus_vit_micro", "lotus_vit_tiny", "lotus_vit_small"]


def _cfg(img: int) -> dict:
    # No hosted weights: these models are trained from scratch (model.checkpoint loads local ones).
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, img, img),
        "pool_size": None,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    }


default_cfgs = generate_default_cfgs(
    {
        "lotus_vit_micro.untrained": _cfg(16),
        "lotus_vit_tiny.untrained": _cfg(32),
        "lotus_vit_small.untrained": _cfg(32),
    }
)


def _create(variant: str, pretrained: bool, defaults: dict, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; pass model.checkpoint (a local file) instead")
    args = {**defaults, **kwargs}
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn, **args
    )


@register_model
def lotus_vit_micro(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for tests: 16 px, patch 4, dim 64, depth 2, 2 heads (~0.1 M params)."""
    return _create(
        "lotus_vit_micro",
        pretrained,
        dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
        **kwargs,
    )


@register_model
def lotus_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for small images: 32 px, patch 4, dim 192, depth 4, 3 heads (~1.8 M params)."""
    return _create(
        "lotus_vit_tiny",
        pretrained,
        dict(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0),
        **kwargs,
    )


@register_model
def lotus_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32 px images (CIFAR scale): patch 4, dim 384, depth 6, 6 heads (~10.7 M params)."""
    return _create(
        "lotus_vit_small",
        pretrained,
        dict(img_size=32, patch_size=4, embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
        **kwargs,
    )
