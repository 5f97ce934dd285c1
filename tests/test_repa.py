"""REPA: the aligned feature is the block's read-out of the streams, the loss is REPA's negative cosine, the encoder
never trains and never enters a state_dict, the projector and the DiT get gradients; the local-file encoder loader."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import hcvision.models.dit  # noqa: F401  (registers the DiT names)
from hcvision.cli import UsageError
from hcvision.connections import expand_streams, reduce_streams
from hcvision.diffusion import make_objective
from hcvision.diffusion.repa import REPA, base_model, load_repa_encoder, load_repa_encoder_for

TINY = dict(embed_dim=32, depth=3, num_heads=2)


def tiny_dit(kind: str = "shc2"):
    torch.manual_seed(0)
    model = timm.create_model(f"dit_digits_2_{kind}", **TINY)
    with torch.no_grad():  # adaLN-Zero starts at zero: perturb so every block does something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def stand_in_encoder(patch: int = 3, dim: int = 24):
    """A small random timm ViT in place of DINOv2: 4x4 patches of 3 px -> a 12 px input (the digits are resized)."""
    torch.manual_seed(1)
    return timm.create_model("vit_small_patch14_dinov2", img_size=4 * patch, patch_size=patch, embed_dim=dim, depth=1,
                             num_heads=2, num_classes=0)


def batch(n: int = 3):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([1, 4, 7][:n])


@pytest.mark.parametrize("kind", ["res", "shc2", "dfc2", "mhc2"])
def test_aligned_feature_is_the_blocks_stream_readout_and_loss_is_negative_cosine(kind):
    model, enc = tiny_dit(kind), stand_in_encoder()
    repa = REPA(model, enc, block=2, weight=0.5, projector_dim=16).eval()  # no random label dropout: the hand
    x, y = batch()                                                          # computation below sees the same labels
    t = torch.tensor([10, 500, 990])
    out = repa(x, t, y)
    torch.testing.assert_close(out, model(x, t, y))  # the wrapper's forward is the DiT's
    with torch.no_grad():  # independent: run the first 2 blocks by hand and read the streams out
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        H = expand_streams(h, model.connection, model.rate)
        for blk in model.blocks[:2]:
            H = blk(H, c)
        tokens = reduce_streams(H, model.connection)
        projected = repa.projector(tokens)
    torch.testing.assert_close(repa.projected_tokens(), projected, rtol=1e-5, atol=1e-6)
    feats = repa.encode(x)
    assert feats.shape == (3, 16, 24)  # the encoder's 4x4 patch grid = the DiT's 4x4 token grid
    p, f = projected.double().numpy(), feats.double().numpy()
    cos = (p * f).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(f, axis=-1))
    np.testing.assert_allclose(repa.alignment_loss(x).detach().numpy(), -cos.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(repa.alignment_loss(features=feats).detach().numpy(), -cos.mean(-1), rtol=1e-5)


def test_encoder_never_trains_and_never_enters_a_state_dict():
    model, enc = tiny_dit("dhc2"), stand_in_encoder()
    enc_before = {k: v.clone() for k, v in enc.state_dict().items()}
    dit_keys = set(model.state_dict())
    repa = REPA(model, enc, block=1, weight=0.5, projector_dim=16)
    assert not any(p is q for p in repa.parameters() for q in enc.parameters())
    assert set(repa.state_dict()) == {f"model.{k}" for k in dit_keys} | {f"projector.{k}" for k in
                                                                          repa.projector.state_dict()}
    assert set(base_model(repa).state_dict()) == dit_keys and base_model(model) is model

    objective = make_objective("flow", time_sampling="logit_normal")
    opt = torch.optim.AdamW(repa.parameters(), lr=1e-2)
    x, y = batch()
    t = objective.sample_timesteps(3, torch.Generator().manual_seed(3))
    diffusion = objective.training_losses(repa, x, t, y=y)["loss"].mean()
    align = repa.alignment_loss(x).mean()
    (diffusion + repa.weight * align).backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    # The alignment loss alone reaches the blocks up to the aligned one, and not the blocks after it.
    repa.zero_grad(set_to_none=True)
    repa(x, objective.model_time(t), y)
    repa.alignment_loss(x).mean().backward()
    first = [p.grad for p in model.blocks[0].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in first)
    assert all(p.grad is None for p in model.blocks[1].parameters())
    assert all(p.grad is None for p in model.final_layer.parameters())
    opt.step()
    for k, v in enc.state_dict().items():
        assert torch.equal(v, enc_before[k])


def test_ema_copy_shares_the_frozen_encoder_and_the_bare_dit_skips_the_projector():
    """train_dit keeps an fp32 EMA (timm's ModelEmaV3, a deep copy) of the REPA wrapper: the copy must not hold a second
    encoder (DINOv2-B: ~350 MB), and sampling with a bare DiT (its EMA copy included) must not run the projector."""
    from hcvision.engine import create_ema

    model, enc = tiny_dit("shc2"), stand_in_encoder()
    repa = REPA(model, enc, block=1, weight=0.5, projector_dim=16)
    ema = create_ema(repa, 0.9)
    assert repa.encoder is enc and ema.module.encoder is enc
    assert ema.module.model is not model and set(ema.module.state_dict()) == set(repa.state_dict())
    x, y = batch()
    t = torch.tensor([10, 500, 990])
    repa(x, t, y)
    assert repa._captured is not None
    for wrapper in (repa, ema.module):
        wrapper._captured = None
        wrapper.model(x, t, y)  # the hook stays registered but keeps nothing outside the wrapper's forward
        assert wrapper._captured is None
    ema.update(repa)
    repa(x, t, y)
    assert repa._captured is not None and repa.alignment_loss(x).shape == (3,)


def test_bad_options_and_missing_encoder_file_are_clear_errors(tmp_path):
    model, enc = tiny_dit(), stand_in_encoder()
    with pytest.raises(ValueError, match=r"repa_block=4 is not valid; expected an int in \[1, 3\]"):
        REPA(model, enc, block=4)
    with pytest.raises(UsageError, match=r"repa_block=4 is not valid; expected a block in 1..3"):  # before loading
        load_repa_encoder_for(model, 4, str(tmp_path / "nope.safetensors"))
    with pytest.raises(UsageError, match=r"data_dir='lat/' holds vae latents only; use pixel data or repa_weight=0"):
        load_repa_encoder_for(model, 1, "", data={"mode": "vae", "data": "lat/"})
    with pytest.raises(ValueError, match=r"repa_weight=-1"):
        REPA(model, enc, block=1, weight=-1.0)
    with pytest.raises(RuntimeError, match="forward call first"):
        REPA(model, enc, block=1).alignment_loss(batch()[0])
    with pytest.raises(UsageError, match=r"repa_encoder is empty.*never downloads"):
        load_repa_encoder("")
    with pytest.raises(UsageError, match=r"repa_encoder='.*nope.safetensors' does not exist"):
        load_repa_encoder(str(tmp_path / "nope.safetensors"))


def test_encoder_loads_from_a_local_file_through_timm(tmp_path):
    """The real loading path (timm pretrained=True with a file overlay) on a small DINOv2-shaped file."""
    kw = dict(embed_dim=24, depth=1, num_heads=2, patch_size=14)
    torch.manual_seed(4)
    src = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **kw)
    path = tmp_path / "dinov2_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = load_repa_encoder(str(path), "vit_small_patch14_dinov2", img_size=56, **kw)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    for k, v in src.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"repa_encoder='.*broken.safetensors' cannot be loaded"):
        load_repa_encoder(str(broken), "vit_small_patch14_dinov2", img_size=56, **kw)
