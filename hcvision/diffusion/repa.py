"""REPA: representation alignment of a DiT's hidden tokens with a frozen vision encoder (Yu et al. 2025, 2410.06940).

REPA adds ``lambda * L_REPA`` to the diffusion loss (Eq. 8), with (Eq. 7)::

    L_REPA = -E[ 1/N sum_n cos( y*_n, h_phi(h_t^[n]) ) ]

``y* = f(x_0)`` are the patch features of a frozen self-supervised encoder (DINOv2) on the clean image, ``h_t`` the
DiT's tokens after block ``block`` for the noisy input, and ``h_phi`` a trainable MLP projector (3 linear layers with
SiLU, hidden 2048). REPA's defaults: ``lambda = 0.5``, the tokens after block 8 of SiT-XL/2's 28 (``--encoder-depth
8``), DINOv2-B.

For hyper-connection DiTs the tokens after a block are ``n`` streams ``(B, T, n, c)``; the aligned feature is that
block's read-out of the streams, :func:`hcvision.connections.reduce_streams` (the sum of the streams for HC kinds, the
concatenated fractions for FC kinds, the one stream for the residual baseline), i.e. exactly what the final layer
would see if the network stopped there. The tokens are taken with a forward hook on ``model.blocks[block - 1]``, so
the model class needs no change.

:class:`REPA` wraps the DiT: ``forward(x, t, y)`` is the DiT's, and keeps the projected tokens for
:meth:`REPA.alignment_loss`. The projector is a submodule (it trains, it is in the wrapper's ``state_dict`` and in a
training checkpoint); the encoder is held outside the module tree: it never trains, never enters any ``state_dict``
and is never moved by ``.to()`` (it follows the images' device). Final weights are the DiT's alone
(``repa.model.state_dict()``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cli import UsageError

__all__ = ["REPA", "RepaProjector", "DEFAULT_ENCODER", "load_repa_encoder", "load_repa_encoder_for", "base_model",
           "alignment_loss"]

DEFAULT_ENCODER = "vit_base_patch14_dinov2"  # REPA's best encoder, DINOv2-B/14 (timm name)


class RepaProjector(nn.Sequential):
    """REPA's projector ``h_phi``: Linear(C, hidden), SiLU, Linear(hidden, hidden), SiLU, Linear(hidden, D)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                         nn.Linear(hidden_dim, out_dim))


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``-1/N sum_n cos(projected_n, target_n)`` (REPA Eq. 7) for ``(B, N, D)`` tokens."""
    if projected.shape != target.shape:
        raise ValueError(f"projected tokens {tuple(projected.shape)} and encoder features {tuple(target.shape)} "
                         "must have the same shape (B, N, D)")
    return -F.cosine_similarity(projected, target, dim=-1).mean(dim=-1)


def _encoder_patch_size(encoder: nn.Module) -> Tuple[int, int]:
    patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise ValueError("the REPA encoder must be a timm ViT (with patch_embed.patch_size and forward_features)")
    return (patch, patch) if isinstance(patch, int) else tuple(patch)


class _Shared:
    """Holds the frozen encoder outside the module tree. Copies share it: an EMA copy of the model (timm's ModelEmaV3
    deep-copies) must not hold a second, never-used encoder (DINOv2-B: 86M parameters, ~350 MB in fp32)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Shared":
        return self


class REPA(nn.Module):
    """A DiT plus REPA's projector, aligning the tokens after ``block`` blocks with ``encoder``'s patch features.

    Args:
        model: the DiT (needs ``blocks``, ``embed_dim``, ``connection``, ``grid_size``).
        encoder: a frozen timm ViT (DINOv2 from :func:`load_repa_encoder`, or a stand-in); its patch grid at the
            input resolution chosen here must equal the DiT's token grid (REPA: 224 px DINOv2 for 256 px images).
        block: align the output of blocks ``1..block`` (1-based, REPA's ``--encoder-depth``; default 8).
        weight: ``lambda`` of the total loss ``L_diffusion + lambda * L_REPA`` (default 0.5).
        projector_dim: hidden width of the projector (REPA: 2048).
    """

    def __init__(self, model: nn.Module, encoder: nn.Module, block: int = 8, weight: float = 0.5,
                 projector_dim: int = 2048) -> None:
        super().__init__()
        depth = len(model.blocks)
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= depth:
            raise ValueError(f"repa_block={block!r} is not valid; expected an int in [1, {depth}] (the model has "
                             f"{depth} blocks; REPA uses 8 of 28)")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"repa_weight={weight!r} is not valid; expected a number >= 0 (REPA: 0.5)")
        self.model = model
        self.block, self.weight = block, float(weight)
        encoder.eval().requires_grad_(False)
        self._frozen = _Shared(encoder)  # not registered: no parameters, no state_dict, no .to(), not copied
        self._capturing = False
        pe = _encoder_patch_size(encoder)
        self.encoder_input_size = tuple(g * p for g, p in zip(model.grid_size, pe))
        self.projector = RepaProjector(model.embed_dim, int(encoder.embed_dim), projector_dim)
        self._captured: Optional[Tensor] = None
        self._hook = model.blocks[block - 1].register_forward_hook(self._capture)

    @property
    def encoder(self) -> nn.Module:
        return self._frozen.module

    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        # Only a reference, no computation: under gradient checkpointing this hook runs inside the checkpointed
        # region, whose recomputation must save the same tensors; the DiT called on its own (sampling, an EMA copy)
        # or a recomputed block keeps nothing.
        if self._capturing:
            self._captured = output

    def projected_tokens(self) -> Tensor:
        """``h_phi(h_t)``: the projector on the aligned block's tokens of the last forward (for HC kinds the block's
        read-out of the streams), ``(B, T, D_encoder)``."""
        if self._captured is None:
            raise RuntimeError("alignment_loss needs a forward call first (the tokens are taken during forward)")
        out = self._captured
        return self.projector(out if out.ndim == 3 else self.model.connection_record.reduce(out))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The DiT's no-decay names under this wrapper's ``model.`` prefix (timm's optimizer factory reads this from
        the module it is given: without it, the static connection parameters would be decayed under REPA)."""
        inner = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in (inner() if inner is not None else ())}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The DiT's layer groups under this wrapper's ``model.`` prefix; the projector, unmatched, sits with the head
        (layer-wise LR decay then scales the DiT as without REPA)."""
        def prefixed(pattern: str) -> str:
            return pattern.replace("^", r"^model\.")

        return {k: prefixed(v) if isinstance(v, str) else [(prefixed(p), o) for p, o in v]
                for k, v in self.model.group_matcher(coarse).items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The DiT's; a recomputed block does not re-project (the hook only acts inside :meth:`forward`)."""
        self.model.set_grad_checkpointing(enable)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The DiT's forward; the aligned block's output of this call is kept for :meth:`alignment_loss`."""
        self._captured, self._capturing = None, True
        try:
            return self.model(*args, **kwargs)
        finally:
            self._capturing = False

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Frozen patch features ``(B, N, D)`` of images in [-1, 1] ``(B, 1 or 3, H, W)``: resized (bicubic) to the
        encoder's input size, grey replicated to RGB, normalised with the encoder's mean/std (REPA's preprocessing)."""
        enc = self.encoder
        param = next(enc.parameters(), None)
        if param is not None and param.device != images.device:
            enc.to(images.device)
        x = (images.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.encoder_input_size:
            x = F.interpolate(x, size=self.encoder_input_size, mode="bicubic", align_corners=False)
        cfg = getattr(enc, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=x.device).reshape(1, -1, 1, 1)
        feats = enc.forward_features((x - mean) / std)
        return feats[:, getattr(enc, "num_prefix_tokens", 0):]

    def alignment_loss(self, images: Optional[Tensor] = None, features: Optional[Tensor] = None) -> Tensor:
        """Per-sample ``L_REPA`` for the last forward call: images (clean, [-1, 1]) or precomputed features."""
        projected = self.projected_tokens()
        if features is None:
            if images is None:
                raise ValueError("alignment_loss needs the clean images or their encoder features")
            features = self.encode(images)
        return alignment_loss(projected, features.to(projected.dtype))


def base_model(model: nn.Module) -> nn.Module:
    """The DiT inside a :class:`REPA` wrapper (the model itself otherwise): what final weights and sampling use."""
    return model.model if isinstance(model, REPA) else model


def load_repa_encoder(path: str, model_name: str = DEFAULT_ENCODER, img_size: int = 224,
                      **model_kwargs: Any) -> nn.Module:
    """A frozen timm encoder (DINOv2 by default) from a local weights file, in eval mode, without downloads.

    Loaded by :func:`hcvision.models.loading.load_dinov2` (the FD-DINOv2 loader: safe, finite, position embedding
    resampled to ``img_size``). Errors are :class:`UsageError` naming the ``repa_encoder`` option.
    """
    from ..models.loading import load_dinov2

    if not path:
        raise UsageError(f"repa_encoder is empty: REPA needs a local weights file of its frozen encoder "
                         f"({model_name}, e.g. timm's {model_name}.lvd142m downloaded beforehand); hcvision never "
                         "downloads weights. Set repa_encoder=PATH or repa_weight=0")
    if not Path(path).is_file():
        raise UsageError(f"repa_encoder={str(path)!r} does not exist; accepted: a local weights file of "
                         f"{model_name} (.safetensors or .pth)")
    try:
        return load_dinov2(path, model_name, model_kwargs, img_size=img_size, key="repa_encoder_model")[0]
    except UsageError as err:
        raise UsageError(f"repa_encoder={str(path)!r} cannot be loaded as {model_name!r} ({err})") from None


def load_repa_encoder_for(dit: nn.Module, block: int, path: str, model_name: str = DEFAULT_ENCODER,
                          data: Optional[Dict[str, Any]] = None, **model_kwargs: Any) -> nn.Module:
    """:func:`load_repa_encoder` sized for ``dit``: it reads images of the DiT's token grid times its own patch size
    (REPA: 16 x 14 = 224 px for SiT-XL/2 at 256 px), and ``block`` (1-based) must be one of the DiT's. ``data`` (the
    trainer's data info) must be pixels: the encoder sees the clean images, which a latent directory does not hold."""
    mode = (data or {}).get("mode", "pixels")
    if mode != "pixels":
        raise UsageError(f"REPA (repa_weight > 0) needs the clean images for its encoder, but data_dir="
                         f"{data.get('data')!r} holds {mode} latents only; use pixel data or repa_weight=0")
    depth = len(dit.blocks)
    if not 1 <= block <= depth:
        raise UsageError(f"repa_block={block} is not valid; expected a block in 1..{depth} (model has {depth} blocks)")
    patch = int(model_kwargs.get("patch_size", 14))  # DINOv2's patch is 14
    return load_repa_encoder(path, model_name, img_size=dit.grid_size[0] * patch, **model_kwargs)
