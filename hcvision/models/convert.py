"""Checkpoint conversion for both families: upcycling residual weights, official and diffusers DiT, timm's adaptation.

Upcycling: the connection inits (HC Eq. 14, FC Eq. 15, our mHC init) compute the Pre-Norm residual network, so a
checkpoint without connection parameters (a vanilla timm ViT, an official or diffusers DiT, an hcvision ``_res``
model) is completed with the model's own connection parameters and computes what its source computed.

timm's ``load_pretrained`` calls a model's ``pretrained_filter_fn`` first, and only then drops the classifier (when
``num_classes`` differs from the pretrained cfg's) and adapts the first conv (when ``in_chans`` differs). The filters
here therefore leave exactly those tensors to timm when it is going to adapt them (``timm_adapts=True``, what timm's
call gets) and check every other tensor, naming the ones that do not fit. :func:`hcvision.models.filter_checkpoint`
(the loader of :func:`hcvision.models.loading.load_model`) passes ``timm_adapts=False``: there every tensor must fit.

DiT: official checkpoints (``.pt`` state dicts, possibly wrapped as DiT's ``{"model", "ema", ...}``) load as they are;
diffusers ``DiTTransformer2DModel`` state dicts are renamed by :func:`diffusers_to_dit_state_dict`. diffusers computes
two things differently from DiT (see ``hcvision.models.dit.NUMERICS``), so a diffusers checkpoint loads only into a
model built with ``numerics="diffusers"``; to run its weights with DiT's numerics, convert explicitly
(``diffusers_to_dit_state_dict``) and load the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from timm.models.vision_transformer import checkpoint_filter_fn as timm_vit_filter_fn
from torch import nn

from ..io import unwrap_state_dict

__all__ = [
    "WEIGHTS_FILE_NAMES", "check_pretrained_file",
    "is_connection_key", "split_connection_state", "complete_connections", "check_fits", "timm_adapted_keys",
    "vit_checkpoint_filter_fn", "dit_checkpoint_filter_fn", "diffusers_to_dit_state_dict", "is_diffusers_state_dict",
]

StateDict = Dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Shared: connection parameters, fit checks, timm's adaptation
# ---------------------------------------------------------------------------------------------------------------
def is_connection_key(key: str) -> bool:
    """Connection parameters live in ``blocks.{i}.attn_conn.*`` / ``blocks.{i}.mlp_conn.*``."""
    return "_conn." in key


def split_connection_state(state_dict: Mapping[str, torch.Tensor]) -> Tuple[StateDict, StateDict]:
    """(everything else, connection parameters)."""
    body = {k: v for k, v in state_dict.items() if not is_connection_key(k)}
    return body, {k: v for k, v in state_dict.items() if is_connection_key(k)}


def complete_connections(body: StateDict, connection_part: StateDict, target: Mapping[str, torch.Tensor]) -> StateDict:
    """``body`` plus the checkpoint's connection parameters, or the model's own (Pre-Norm-equivalent) init when the
    checkpoint has none."""
    merged = dict(body)
    merged.update(connection_part or {k: v for k, v in target.items() if is_connection_key(k)})
    return merged


def _listed(items: list, limit: int = 8) -> str:
    return f"{items[:limit]}" + (" ..." if len(items) > limit else "")


def check_fits(merged: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str, accepted: str,
               extra_mismatches: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` naming every mismatched, missing or unexpected tensor (the first few of each); the keys
    in ``skip`` are left to the caller (timm adapts them)."""
    skip = set(skip)
    mismatched = list(extra_mismatches) + [
        f"{k}: checkpoint {tuple(merged[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items() if k in merged and k not in skip and merged[k].shape != v.shape]
    missing = sorted(k for k in target if k not in merged and k not in skip)
    unexpected = sorted(k for k in merged if k not in target and k not in skip)
    if not (mismatched or missing or unexpected):
        return
    detail = []
    if mismatched:
        detail.append("mismatched shapes: " + "; ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else ""))
    if missing:
        detail.append(f"missing from checkpoint: {_listed(missing)}")
    if unexpected:
        detail.append(f"not in model: {_listed(unexpected)}")
    raise ValueError(f"checkpoint does not fit {what}: " + " | ".join(detail) + f". Accepted: {accepted}.")


#: the weights files of a directory in timm's save_for_hf layout, safest first
WEIGHTS_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


def check_pretrained_file(pretrained: bool, kwargs: Dict[str, Any]) -> None:
    """Before timm loads ``pretrained_cfg_overlay=dict(file=...)``: a directory is read as timm's save_for_hf layout
    (its ``model.safetensors``), and a directory without weights or a missing file is a ``FileNotFoundError`` that
    says so (timm's loader raises one without a message)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = overlay.get("file") if isinstance(overlay, Mapping) else None
    if not pretrained or not file:
        return
    path = Path(file)
    if path.is_dir():
        found = [path / name for name in WEIGHTS_FILE_NAMES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"pretrained file {str(path)!r} is a directory without weights: looked for "
                                    f"{' and '.join(WEIGHTS_FILE_NAMES)}; accepted: a weights file, or a directory "
                                    "holding one of those")
        kwargs["pretrained_cfg_overlay"] = {**overlay, "file": str(found[0])}
    elif not path.is_file():
        raise FileNotFoundError(f"pretrained file {str(path)!r} does not exist")


def _names(value: Any) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def timm_adapted_keys(model: nn.Module) -> set:
    """The tensors timm's ``load_pretrained`` replaces after the filter, from ``model.pretrained_cfg``: the
    classifier's when ``num_classes`` differs from the cfg's (it is dropped: a fresh head), the first conv's weight
    when ``in_chans`` differs from the cfg's ``input_size[0]`` (``adapt_input_conv``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    keys = set()
    if "num_classes" in cfg and getattr(model, "num_classes", None) != cfg["num_classes"]:
        keys |= {f"{name}.{leaf}" for name in _names(cfg.get("classifier")) for leaf in ("weight", "bias")}
    source_chans = (cfg.get("input_size") or (3,))[0]
    if getattr(model, "in_chans", source_chans) != source_chans:
        keys |= {f"{name}.weight" for name in _names(cfg.get("first_conv"))}
    return keys


def _fit(state_dict: StateDict, model: nn.Module, timm_adapts: bool, what: str, accepted: str,
         extra_mismatches: Iterable[str] = ()) -> StateDict:
    """Complete missing connection parameters with the model's init, then check that everything fits."""
    target = model.state_dict()
    body, connection_part = split_connection_state(state_dict)
    merged = complete_connections(body, connection_part, target)
    check_fits(merged, target, what, accepted, extra_mismatches, skip=timm_adapted_keys(model) if timm_adapts else ())
    return merged


def _unwrap(state_dict: Mapping[str, Any]) -> StateDict:
    # Training checkpoints (timm train.py, DiT's train.py) hold EMA weights next to the raw ones; like timm's loader
    # (use_ema=True) and DiT's sampler, take the EMA weights.
    return dict(unwrap_state_dict(state_dict, prefer_ema=True))


# ---------------------------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------------------------
def vit_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module, timm_adapts: bool = True) -> StateDict:
    """Load an hcvision ViT checkpoint, or upcycle a vanilla timm ViT checkpoint of the same size.

    A checkpoint without connection parameters gets the model's own init for them (Pre-Norm equivalent). timm's own
    conversions (position-embedding resampling, patch-embedding layouts) apply to the vanilla part. Any other
    disagreement (another size, another family, another connection kind) raises ``ValueError`` naming the tensors.
    """
    body, connection_part = split_connection_state(_unwrap(state_dict))
    body = timm_vit_filter_fn(body, model)
    return _fit({**body, **connection_part}, model, timm_adapts,
                what=f"{model.connection} x{model.rate} ViT (embed_dim={model.embed_dim}, depth={len(model.blocks)})",
                accepted="a timm ViT or an hcvision ViT of the same size and patch size")


# ---------------------------------------------------------------------------------------------------------------
# DiT: official and diffusers layouts
# ---------------------------------------------------------------------------------------------------------------
_DIFFUSERS_BLOCK = {  # diffusers name inside transformer_blocks.{i} -> official name inside blocks.{i}
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "attn1.norm_q": "attn.q_norm",
    "attn1.norm_k": "attn.k_norm",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_DIFFUSERS_EMB = {  # per-block embedder copies (norm1.emb.*) -> the one official embedder
    "timestep_embedder.linear_1": "t_embedder.mlp.0",
    "timestep_embedder.linear_2": "t_embedder.mlp.2",
    "class_embedder.embedding_table": "y_embedder.embedding_table",
}


def is_diffusers_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys are diffusers ``DiTTransformer2DModel``'s."""
    return any(k.startswith(("transformer_blocks.", "pos_embed.proj.", "proj_out_1.")) for k in state_dict)


def diffusers_to_dit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a diffusers ``DiTTransformer2DModel`` state dict to official DiT names.

    q/k/v projections are concatenated into ``qkv`` (DiT's fused layout: rows q, then k, then v). diffusers keeps a
    copy of the timestep and label embedders in every block and uses block 0's for the final layer; they must be
    identical (as in converted official checkpoints), else ``ValueError`` names the differing tensors.
    """
    out: StateDict = {}
    unknown, differ = [], []
    qkv: Dict[Tuple[int, str], StateDict] = {}
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition(".")
        if stem in _DIFFUSERS_TOP:
            out[f"{_DIFFUSERS_TOP[stem]}.{leaf}"] = value
        elif key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        elif key.startswith("transformer_blocks."):
            _, index, rest = key.split(".", 2)
            sub, _, leaf = rest.rpartition(".")
            if sub in _DIFFUSERS_BLOCK:
                out[f"blocks.{index}.{_DIFFUSERS_BLOCK[sub]}.{leaf}"] = value
            elif sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
                qkv.setdefault((int(index), leaf), {})[sub[-1]] = value
            elif sub.startswith("norm1.emb.") and sub[len("norm1.emb."):] in _DIFFUSERS_EMB:
                name = f"{_DIFFUSERS_EMB[sub[len('norm1.emb.'):]]}.{leaf}"
                first = state_dict.get(f"transformer_blocks.0.{rest}")
                if first is None:
                    unknown.append(key)
                elif not torch.equal(value, first):
                    differ.append(key)
                out[name] = first if first is not None else value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (index, leaf), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"transformer_blocks.{index}.attn1.to_{{q,k,v}}.{leaf} (incomplete: {sorted(parts)})")
            continue
        out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if differ:
        raise ValueError(
            f"diffusers DiT checkpoint has per-block timestep/label embedders that differ from block 0's: {differ[:6]}"
            + (" ..." if len(differ) > 6 else "") + ". A DiT has one embedder; accepted: checkpoints whose copies are "
            "identical (e.g. converted official DiT weights)")
    if unknown:
        raise ValueError(f"unrecognised diffusers DiT tensors {unknown[:8]}" + (" ..." if len(unknown) > 8 else "")
                         + "; accepted: DiTTransformer2DModel with norm_type='ada_norm_zero' and affine-free norms")
    return out


def _check_pos_embed(stored: Optional[torch.Tensor], own: torch.Tensor) -> list:
    """Official checkpoints keep DiT's fixed sin-cos positions as a frozen parameter: it must be the model's own."""
    if stored is None:
        return []
    if tuple(stored.shape) != tuple(own.shape):  # another grid (input or patch size) or width: reported with the rest
        return [f"pos_embed: checkpoint {tuple(stored.shape)} vs model {tuple(own.shape)}"]
    if own.device.type != "meta" and not torch.allclose(stored.float().cpu(), own.float().cpu(), atol=1e-5):
        raise ValueError("pos_embed: the checkpoint's position embedding is not DiT's fixed 2-D sin-cos embedding "
                         f"(max difference {(stored.float().cpu() - own.float().cpu()).abs().max():.3g})")
    return []


def dit_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module, timm_adapts: bool = True) -> StateDict:
    """Official DiT, diffusers ``DiTTransformer2DModel`` or hcvision state dict -> this model's state dict.

    * A stored ``pos_embed`` must equal the model's fixed one.
    * Without connection parameters, the model's init is used (the residual DiT exactly).
    * A diffusers checkpoint needs a model built with ``numerics="diffusers"`` (else ``ValueError``): its outputs are
      diffusers' only with diffusers' numerics. ``diffusers_to_dit_state_dict`` converts explicitly for DiT's.
    * Any other disagreement (size, patch, channels, classes, QK-Norm, connection kind) raises ``ValueError`` naming
      the tensors.
    """
    state_dict = _unwrap(state_dict)
    if is_diffusers_state_dict(state_dict):
        if model.numerics != "diffusers":
            raise ValueError(
                f"this is a diffusers DiTTransformer2DModel checkpoint, and the model was built with "
                f"numerics={model.numerics!r}: diffusers computes timestep frequencies and the MLP norm's eps "
                "differently, so its outputs need numerics='diffusers' (timm.create_model(..., numerics='diffusers')); "
                "to run its weights with DiT's numerics on purpose, load diffusers_to_dit_state_dict(state_dict)")
        state_dict = diffusers_to_dit_state_dict(state_dict)
    elif "x_embedder.proj.weight" not in state_dict:
        raise ValueError(f"not a DiT checkpoint: expected official names (x_embedder.proj.weight, "
                         "blocks.0.attn.qkv.weight, ...) or diffusers names (pos_embed.proj.weight, "
                         f"transformer_blocks.0...); found e.g. {sorted(state_dict)[:6]}")
    mismatched = _check_pos_embed(state_dict.pop("pos_embed", None), model.pos_embed)
    has_qk = any(".attn.q_norm." in k for k in state_dict)
    if model.qk_norm and not has_qk:
        raise ValueError("the checkpoint has no QK-Norm parameters (blocks.*.attn.q_norm/k_norm) but the model uses "
                         "QK-Norm; create it with qk_norm=False (the original DiT) to load this checkpoint")
    if has_qk and not model.qk_norm:
        raise ValueError("the checkpoint has QK-Norm parameters (blocks.*.attn.q_norm/k_norm); create the model with "
                         "qk_norm=True to load it")
    return _fit(state_dict, model, timm_adapts, extra_mismatches=mismatched,
                what=(f"this {model.connection} x{model.rate} DiT (embed_dim={model.embed_dim}, "
                      f"depth={len(model.blocks)}, patch_size={model.patch_size}, in_chans={model.in_chans}, "
                      f"num_classes={model.num_classes}, input_size={model.input_size})"),
                accepted="an official, diffusers or hcvision DiT of the same size")
