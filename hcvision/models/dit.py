"""Diffusion Transformers (DiT, Peebles & Xie 2023, arXiv 2212.09748) with Hyper-, Frac- or mHC connections.

The network is DiT with adaLN-Zero blocks, and it keeps the official parameter names (``x_embedder.proj``,
``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``blocks.{i}.attn.{qkv,proj}``, ``blocks.{i}.mlp.{fc1,fc2}``,
``blocks.{i}.adaLN_modulation.1``, ``final_layer.{linear,adaLN_modulation.1}``), so official checkpoints load as is.
Three things change:

* after patch embedding + positions the tokens become streams (``expand_streams``), and before the final layer they
  are read out (``reduce_streams``). The final LayerNorm is scale-invariant, so the HC init (streams summed)
  computes the residual DiT exactly;
* in block ``i`` the gated adaLN branches ``gate * F(modulate(LN(h), shift, scale))`` are the branches of the
  connections ``blocks.{i}.attn_conn`` and ``blocks.{i}.mlp_conn`` (sublayers ``2i`` and ``2i + 1``, HC Eqs. 2-5);
* QK-Norm (LayerNorm on queries and keys per head) is on by default, as in the HC paper's DiT runs (App. E.1);
  ``qk_norm=False`` is the original DiT.

Checkpoints (:mod:`hcvision.models.convert`): :func:`checkpoint_filter_fn` loads official DiT state dicts (``.pt``,
loaded with ``weights_only=True``), diffusers ``DiTTransformer2DModel`` state dicts (``.safetensors``, into a model
built with ``numerics="diffusers"``) and hcvision checkpoints. Missing connection parameters take their init, which is
the Pre-Norm (here: adaLN) residual network, so with ``qk_norm=False`` every connection kind gives the source model's
outputs.

Names: ``dit_{s,b,l,xl}_{2,4,8}_{res,shc2,shc4,dhc2,...,mhc4}`` (256x256 ImageNet latents: 4x32x32, 1000 classes) and
``dit_digits_2_*`` (scikit-learn digits in pixel space: 1x8x8, 10 classes) for the CPU demo.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..connections import KindRecord, kind_record
from ..layers import FinalLayer, LabelEmbedder, TimestepEmbedder, adaln_modulation, modulate, sincos_pos_embed_2d
from ._common import (
    block_connections,
    connection_arguments,
    scale_out_projections,
    static_parameter_names,
    variant_title,
)
from ._registry import register_variants, variant_cfgs
from .convert import (
    check_pretrained_file,
    diffusers_to_dit_state_dict,  # noqa: F401  (public here since the first release)
)
from .convert import dit_checkpoint_filter_fn as checkpoint_filter_fn

__all__ = [
    "DiTBlock", "HCDiT", "checkpoint_filter_fn", "diffusers_to_dit_state_dict", "DIT_SIZES", "DIT_MODEL_NAMES",
    "NUMERICS",
]

# Two places where diffusers' DiTTransformer2DModel computes differently from the official DiT (checked on diffusers
# 0.42): its timestep frequencies use ``downscale_freq_shift=1`` and its MLP-side LayerNorm uses ``norm_eps`` (default
# 1e-5; every other LayerNorm there uses 1e-6, as DiT).
NUMERICS: Dict[str, Dict[str, float]] = {
    "dit": dict(timestep_freq_shift=0.0, mlp_norm_eps=1e-6),
    "diffusers": dict(timestep_freq_shift=1.0, mlp_norm_eps=1e-5),
}


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block whose two sublayers sit inside connections. Takes and returns streams ``(B, N, n, c)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        connection: str = "residual",
        rate: int = 1,
        connection_options: Optional[Dict[str, Any]] = None,
        layer_index: int = 0,
        mlp_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)  # diffusers: 1e-5 (NUMERICS)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = adaln_modulation(dim, 6)
        self.attn_conn, self.mlp_conn = block_connections(connection, dim, rate, layer_index, connection_options or {})

    def attn_branch(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor):
        return gate.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift, scale))

    def mlp_branch(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor):
        return gate.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift, scale))

    def forward(self, H: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # Called as modules, so forward hooks on the connections see every call (the analysis tools use them).
        H = self.attn_conn(H, self.attn_branch, shift_msa, scale_msa, gate_msa)
        return self.mlp_conn(H, self.mlp_branch, shift_mlp, scale_mlp, gate_mlp)


def _pair(value: Union[int, Tuple[int, int]], name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


class HCDiT(nn.Module):
    """Class-conditional DiT on latents or pixels, with connection ``connection`` at rate ``rate`` around each sublayer.

    Args:
        input_size: spatial size of the input (int or (H, W)); ``img_size`` is accepted as timm's name for it.
        patch_size: patch size p (DiT: 2, 4, 8).
        in_chans: input channels (4 for SD-VAE latents). timm fills it from the cfg's ``input_size``.
        embed_dim, depth, num_heads, mlp_ratio: transformer size (DiT's hidden_size, depth, num_heads, mlp_ratio).
        num_classes: class count; with ``class_dropout_prob > 0`` id ``num_classes`` is the null class.
        class_dropout_prob: label dropout in training (DiT: 0.1), for classifier-free guidance.
        learn_sigma: predict the variance too: ``2 * in_chans`` output channels (epsilon first).
        qk_norm: LayerNorm on queries and keys (HC paper's DiT runs); ``False`` is the original DiT.
        connection, rate: ``residual``, ``shc``, ``dhc``, ``sfc``, ``dfc`` or ``mhc``; n streams (HC) or m fractions
            (FC).
        tanh: dynamic kinds apply tanh (HC Eqs. 11-13); ``False`` is the paper's ablation.
        connection_options: further ``build_connection`` options.
        scale_out_proj: divide the init of ``attn.proj`` / ``mlp.fc2`` by ``sqrt(n)`` for HC kinds (HC paper, Sec. 4).
        numerics: ``"dit"`` (default) or ``"diffusers"`` (reproduce ``DiTTransformer2DModel``'s timestep frequencies
            and MLP-norm eps, see :data:`NUMERICS`). Fixed at construction; loading a checkpoint never changes it,
            and a diffusers checkpoint loads only into a ``"diffusers"`` model.
    """

    def __init__(
        self,
        input_size: Union[int, Tuple[int, int], None] = None,
        patch_size: int = 2,
        in_chans: int = 4,
        embed_dim: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        qk_norm: bool = True,
        connection: str = "residual",
        rate: int = 1,
        tanh: Optional[bool] = None,
        connection_options: Optional[Dict[str, Any]] = None,
        scale_out_proj: bool = True,
        numerics: str = "dit",
        img_size: Union[int, Tuple[int, int], None] = None,
    ) -> None:
        super().__init__()
        if (input_size is not None and img_size is not None
                and _pair(input_size, "input_size") != _pair(img_size, "img_size")):
            raise ValueError(f"input_size={input_size!r} and img_size={img_size!r} disagree; pass one of them")
        size = input_size if input_size is not None else (img_size if img_size is not None else 32)
        self.input_size = _pair(size, "input_size")
        for name, value in (("patch_size", patch_size), ("in_chans", in_chans), ("embed_dim", embed_dim),
                            ("depth", depth), ("num_heads", num_heads), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(s % patch_size for s in self.input_size):
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size={patch_size}")
        if embed_dim % num_heads or embed_dim % 4:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} and by 4 "
                             "(2-D sin-cos positions)")
        if numerics not in NUMERICS:
            raise ValueError(f"numerics={numerics!r} is not known; accepted: {', '.join(map(repr, NUMERICS))}")
        connection, options = connection_arguments(connection, rate, embed_dim, tanh, connection_options)

        self.connection, self.rate, self.connection_options = connection, rate, options
        self.in_chans, self.num_classes, self.learn_sigma = in_chans, num_classes, bool(learn_sigma)
        self.out_channels = in_chans * 2 if learn_sigma else in_chans
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.num_features = embed_dim
        self.qk_norm = bool(qk_norm)
        self.grad_checkpointing = False
        self.numerics = numerics

        self.x_embedder = PatchEmbed(img_size=self.input_size, patch_size=patch_size, in_chans=in_chans,
                                     embed_dim=embed_dim, bias=True)
        self.t_embedder = TimestepEmbedder(embed_dim, freq_shift=NUMERICS[numerics]["timestep_freq_shift"])
        self.y_embedder = LabelEmbedder(num_classes, embed_dim, class_dropout_prob)
        self.grid_size = (self.input_size[0] // patch_size, self.input_size[1] // patch_size)
        # Fixed, so a buffer; not saved (official checkpoints carry it as a frozen parameter: verified on load).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0),
                             persistent=False)
        self.blocks = nn.ModuleList([
            DiTBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, connection=connection, rate=rate,
                     connection_options=options, layer_index=i, mlp_norm_eps=NUMERICS[numerics]["mlp_norm_eps"])
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(embed_dim, patch_size, self.out_channels)
        self.initialize_weights()
        self.scale_out_proj = scale_out_proj
        if scale_out_proj:
            scale_out_projections(self.blocks, connection, rate)

    @property
    def connection_record(self) -> KindRecord:
        """The connection kind's row of the table: how streams are made from the tokens and read out."""
        return kind_record(self.connection)

    # --- init -----------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT's init: Xavier-uniform linears, zero biases, N(0, 0.02) embedders, adaLN-Zero (modulation, output 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [blk.adaLN_modulation[1] for blk in self.blocks] + [self.final_layer.adaLN_modulation[1],
                                                                          self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- timm API -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (per block: blocks take ``(H, c)``, which timm's checkpoint_seq cannot)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Static connection parameters (HC paper, Sec. 4). DiT itself decays nothing (it trains with wd 0)."""
        return static_parameter_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's layer groups: the embedders, each block, and (unmatched) the final layer as the head, so that
        layer-wise LR decay treats it as timm's ViT treats its head."""
        return dict(stem=r"^x_embedder|^t_embedder|^y_embedder", blocks=[(r"^blocks\.(\d+)", None)])

    @property
    def null_class(self) -> Optional[int]:
        """Label of the unconditional embedding (``num_classes``), or None without label dropout."""
        return self.num_classes if self.y_embedder.has_null_class else None

    # --- forward --------------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, t: Any, y: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """Shapes and dtypes only: checking values would cost a host sync on every call. Values are checked where
        they enter: the diffusion schedule rejects timesteps outside ``[0, T - 1]``, and the trainer and sampler
        draw class ids from the model's own ``num_classes``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        batch = x.shape[0]
        if x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"x has shape {tuple(x.shape)}; this model takes (B, {self.in_chans}, "
                             f"{self.input_size[0]}, {self.input_size[1]}) (in_chans={self.in_chans}, "
                             f"input_size={self.input_size})")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,) or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must be a real tensor of shape ({batch},) or a scalar, got {t.dtype} {tuple(t.shape)}")
        y = torch.as_tensor(y, device=x.device)
        if y.shape != (batch,) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer tensor of class ids with shape ({batch},), got {y.dtype} "
                             f"{tuple(y.shape)}")
        return t, y.long()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, p*p*C) -> (B, C, H, W)`` (token order row-major, pixels inside a patch row-major)."""
        p, (gh, gw), c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward_streams(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Embedded tokens ``(B, N, C)`` and conditioning ``(B, C)`` -> the last streams ``(B, N, n, c)``."""
        H = self.connection_record.expand(x, self.rate)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                H = checkpoint(blk, H, c, use_reentrant=False)
            else:
                H = blk(H, c)
        return H

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noisy input ``x`` (B, C, H, W), timesteps ``t`` (B,), class ids ``y`` (B,) -> ``(B, out_channels, H, W)``.

        With ``learn_sigma`` the first ``in_chans`` output channels are epsilon, the rest the variance interpolation v.
        """
        t, y = self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        H = self.forward_streams(x, c)
        return self.unpatchify(self.final_layer(self.connection_record.reduce(H), c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guidance_channels: Optional[int] = 3) -> torch.Tensor:
        """Classifier-free guidance in one pass, DiT's contract: the batch is ``[cond; uncond]`` (second half of ``y``
        is the null class), only the first half of ``x`` is used, and
        ``eps = eps_u + s (eps_c - eps_u)`` on the first ``guidance_channels`` channels (DiT: 3; ``None``: every
        epsilon channel). Other channels (and the variance) are the conditional / unconditional passes' own.
        """
        from ..diffusion.guidance import check_guidance_channels, guided_output  # the one guidance function

        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got batch {x.shape[0]}")
        k = check_guidance_channels(guidance_channels, self.in_chans)
        half = x[: x.shape[0] // 2]
        cond, uncond = self.forward(torch.cat([half, half]), t, y).chunk(2, dim=0)
        guided = guided_output(cond, uncond, cfg_scale, k, channels=self.in_chans)
        return torch.cat([guided, torch.cat([guided[:, :k], uncond[:, k:]], dim=1)])


# ---------------------------------------------------------------------------------------------------------------
# Registry: sizes x patch sizes x connection kinds x rates
# ---------------------------------------------------------------------------------------------------------------
_WIDTHS = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}  # DiT Table 1
DIT_SIZES: Dict[str, Dict[str, Any]] = {
    f"dit_{size}_{p}": dict(embed_dim=c, depth=d, num_heads=h, patch_size=p)
    for size, (c, d, h) in _WIDTHS.items() for p in (2, 4, 8)
}
# The embedded digits set in pixel space: 1x8x8, 10 classes; patch 2 gives 16 tokens.
DIT_SIZES["dit_digits_2"] = dict(input_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=96, depth=6,
                                 num_heads=4)


def _size_cfg(size: str) -> Dict[str, Any]:
    cfg = {
        "url": "", "num_classes": 1000, "input_size": (4, 32, 32), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": (0.0,) * 4, "std": (1.0,) * 4, "first_conv": "x_embedder.proj",
        "classifier": None, "paper_ids": "arXiv:2212.09748", "tag": "",
    }
    if size.startswith("dit_digits"):
        # pixels in [0, 1] -> [-1, 1], as DiT normalises images before diffusion
        cfg.update(num_classes=10, input_size=(1, 8, 8), mean=(0.5,), std=(0.5,), interpolation="bilinear")
    return cfg


def _describe(size: str, kind: str, rate: int) -> str:
    args = DIT_SIZES[size]
    what = variant_title(kind, rate)
    cfg = _size_cfg(size)
    return (f"DiT ({args['embed_dim']}-d, depth {args['depth']}, {args['num_heads']} heads, "
            f"patch {args['patch_size']}) "
            f"with {what}; input {cfg['input_size']}, {cfg['num_classes']} classes, adaLN-Zero, learned sigma.")


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> HCDiT:
    check_pretrained_file(pretrained, kwargs)
    return build_model_with_cfg(HCDiT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs(variant_cfgs(DIT_SIZES, _size_cfg))
DIT_MODEL_NAMES = register_variants(__name__, DIT_SIZES, _create, _describe, _size_cfg)
