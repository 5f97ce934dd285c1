"""Vision Transformers whose residual connections are Hyper-, Frac- or manifold-constrained Hyper-Connections.

The model subclasses timm's ``VisionTransformer`` and keeps its parameter names and API (``forward_features``,
``forward_head``, ``forward_intermediates``, ``set_grad_checkpointing``, ``group_matcher``, ``dynamic_img_size`` ...).
Only three things change:

* the token sequence is expanded into streams before the blocks and read out after them
  (``hcvision.connections.expand_streams`` / ``reduce_streams``);
* each block wraps its attention and MLP sublayers in a connection (sublayer ``k = 2 i`` and ``2 i + 1``), whose
  parameters live next to the block's own (``blocks.{i}.attn_conn.*``, ``blocks.{i}.mlp_conn.*``);
* fresh HC models scale the init std of the output projections (``attn.proj``, ``mlp.fc2``) by ``1/sqrt(n)``
  (HC paper, Sec. 4: the n streams are summed at the end).

Upcycling: a vanilla timm ViT checkpoint of the same size loads into every variant; the missing connection parameters
take their init (HC Eq. 14, FC Eq. 15, our mHC init), which is exactly the Pre-Norm network, so the logits match.
With another ``num_classes`` (a fresh head) or ``in_chans`` (timm's first-conv adaptation) the pre-logit features
match; see :mod:`hcvision.models.convert`.

Names: ``vit_{tiny,small,base,large,huge}_patch16_224_{res,shc2,shc4,dhc2,...,mhc4}`` and a small family for the
embedded digits data set, ``vit_digits_patch2_8_*`` (8x8 grayscale, 10 classes).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer

from ..connections import KindRecord, kind_record
from ._common import (
    block_connections,
    connection_arguments,
    scale_out_projections,
    static_parameter_names,
    variant_title,
)
from ._registry import register_variants, variant_cfgs
from .convert import check_pretrained_file
from .convert import vit_checkpoint_filter_fn as checkpoint_filter_fn

__all__ = ["HCBlock", "HCVisionTransformer", "checkpoint_filter_fn", "VIT_SIZES", "VIT_MODEL_NAMES"]


class HCBlock(Block):
    """timm's Pre-Norm ``Block`` with each sublayer wrapped in a connection. Takes and returns streams (B, N, n, c)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        connection: str = "residual",
        rate: int = 1,
        connection_options: Optional[Dict[str, Any]] = None,
        layer_index: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads, depth=layer_index, **kwargs)  # timm's Block calls the block index `depth`
        self.attn_conn, self.mlp_conn = block_connections(connection, dim, rate, layer_index, connection_options or {})

    def attn_branch(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, H: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        H = self.attn_conn(H, self.attn_branch, attn_mask, is_causal)
        return self.mlp_conn(H, self.mlp_branch)


def _hc_block(*args: Any, depth: int = 0, **kwargs: Any) -> HCBlock:
    """timm's ``VisionTransformer`` passes the block index as ``depth=i``; hcvision calls it ``layer_index``."""
    return HCBlock(*args, layer_index=depth, **kwargs)


class HCVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with connection kind ``connection`` at rate ``rate`` around every sublayer.

    Args (on top of timm's):
        connection: a registered connection kind (``hcvision.connections.kind_names()``: ``residual``, ``shc``,
            ``dhc``, ``sfc``, ``dfc``, ``mhc``, ``mhclite``, ``kromhc``, ...).
        rate: expansion rate n (HC kinds), number of fractions m (FC kinds); 1 for residual.
        tanh: dynamic kinds apply tanh to their projections (HC Eqs. 11-13); ``False`` is the paper's ablation.
        connection_options: further options for ``build_connection`` (``scale_init``, ``norm``, ``gate_init``,
            ``sinkhorn_iters``, ``res_init_diag`` ...).
        scale_out_proj: scale the init std of ``attn.proj`` and ``mlp.fc2`` by ``1/sqrt(n)`` for HC kinds.
    """

    def __init__(
        self,
        *args: Any,
        connection: str = "residual",
        rate: int = 1,
        tanh: Optional[bool] = None,
        connection_options: Optional[Dict[str, Any]] = None,
        scale_out_proj: bool = True,
        block_fn: Any = None,
        **kwargs: Any,
    ) -> None:
        connection, options = connection_arguments(connection, rate, kwargs.get("embed_dim", 768), tanh,
                                                   connection_options)
        self.connection, self.rate, self.connection_options = connection, rate, options
        super().__init__(*args, block_fn=partial(_hc_block, connection=connection, rate=rate,
                                                 connection_options=options), **kwargs)
        self.scale_out_proj = scale_out_proj
        if scale_out_proj:
            scale_out_projections(self.blocks, connection, rate)

    @property
    def connection_record(self) -> KindRecord:
        """The connection kind's row of the table: how streams are made from the tokens and read out."""
        return kind_record(self.connection)

    # --- timm API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """timm's set plus every static connection parameter (HC paper, Sec. 4)."""
        return set(super().no_weight_decay()) | static_parameter_names(self)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} takes {self.in_chans} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        size = tuple(self.patch_embed.img_size)
        if not self.dynamic_img_size and not self.patch_embed.dynamic_img_pad and tuple(x.shape[-2:]) != size:
            raise ValueError(f"expected images of size {size[0]}x{size[1]}, got {x.shape[-2]}x{x.shape[-1]}; "
                             "create the model with img_size=... or dynamic_img_size=True for other sizes")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_streams(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """Images -> the last streams ``(B, N, n, c)``, before the read-out."""
        H = self.connection_record.expand(self._embed(x), self.rate)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                H = blk(H, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            H = checkpoint_seq(self.blocks, H)
        else:
            H = self.blocks(H)
        return H

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        H = self.forward_streams(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.norm(self.connection_record.reduce(H))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates``; an intermediate is the read-out of the streams after a block."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        H = self.connection_record.expand(self._embed(x), self.rate)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        features = []
        for i, blk in enumerate(blocks):
            if attn_mask is not None or is_causal:
                H = blk(H, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing:
                H = checkpoint(blk, H)
            else:
                H = blk(H)
            if i in take_indices:
                h = self.connection_record.reduce(H)
                features.append(self.norm(h) if norm else h)

        npt = self.num_prefix_tokens
        prefix = [f[:, :npt] for f in features] if npt else None
        features = [f[:, npt:] for f in features]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.dynamic_feat_size((height, width))
            features = [f.reshape(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for f in features]

        if output_dict:
            out: Dict[str, Any] = {"image_intermediates": features}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(self.connection_record.reduce(H))
            return out
        if return_prefix_tokens and prefix is not None:
            features = list(zip(features, prefix))
        if intermediates_only:
            return features
        return self.norm(self.connection_record.reduce(H)), features


# ---------------------------------------------------------------------------------------------------------------
# Registry: sizes x connection kinds x rates
# ---------------------------------------------------------------------------------------------------------------
VIT_SIZES: Dict[str, Dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch16_224": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    # The embedded digits set (scikit-learn): 8x8 grayscale, values 0..16 scaled to [0, 1].
    "vit_digits_patch2_8": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=6,
                                num_heads=4, global_pool="avg"),
}

_DIGITS_MEAN, _DIGITS_STD = (0.3,), (0.375,)  # sklearn digits / 16: mean 0.305, std 0.376


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


def _size_cfg(size: str) -> Dict[str, Any]:
    if size.startswith("vit_digits"):
        return _cfg(num_classes=10, input_size=(1, 8, 8), crop_pct=1.0, interpolation="bilinear",
                    mean=_DIGITS_MEAN, std=_DIGITS_STD)
    return _cfg()


def _describe(size: str, kind: str, rate: int) -> str:
    args = VIT_SIZES[size]
    return (f"ViT ({args['embed_dim']}-d, depth {args['depth']}, patch {args['patch_size']}) with "
            f"{variant_title(kind, rate)}.")


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> HCVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    check_pretrained_file(pretrained, kwargs)
    return build_model_with_cfg(
        HCVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(variant_cfgs(VIT_SIZES, _size_cfg))
VIT_MODEL_NAMES = register_variants(__name__, VIT_SIZES, _create, _describe, _size_cfg)
