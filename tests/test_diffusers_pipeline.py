"""diffusers interop: an hcvision DiT as a ModelMixin/ConfigMixin, and a class-conditional pipeline for it.

Round trips are bit-exact for every connection kind. Sampling is checked against DDPM (learned variance, Improved
DDPM Eq. 15) and DDIM loops written here from the equations, with the same noise draws; latent space uses a small
random AutoencoderKL built here, pixel space the digits DiT.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import hcvision.models  # noqa: F401
from hcvision.diffusion.pipeline import HCDiTPipeline, dit_scheduler
from hcvision.models.diffusers_model import HCDiTTransformer2DModel

DIGITS = "dit_digits_2_{}"
TINY = dict(depth=2)  # the digits DiT is 96-d with 16 tokens; two blocks keep each test well under a second


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """adaLN-Zero starts every output at zero; give every parameter random values so outputs depend on input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + p)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["res", "shc2", "dhc2", "sfc2", "dfc2", "mhc2"])
def test_save_pretrained_round_trip_is_bit_exact(kind, tmp_path):
    name = DIGITS.format(kind)
    wrapped = HCDiTTransformer2DModel(name, TINY).eval()  # eval: no label dropout
    _randomize(wrapped.dit)
    wrapped.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    back = HCDiTTransformer2DModel.from_pretrained(tmp_path)
    assert back.config.model_name == name and back.config.model_kwargs == TINY
    assert (back.config.sample_size, back.config.in_channels, back.config.out_channels, back.config.num_classes) == (
        8, 1, 2, 10)
    a, b = wrapped.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10])  # 10: the null class
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, y).sample, back(x, t, y).sample)
        assert torch.equal(back(x, t, y).sample, wrapped.dit(x, t, y))


def test_from_dit_wraps_and_refuses_lost_kwargs(tmp_path):
    dit = _randomize(timm.create_model(DIGITS.format("dhc2"), tanh=False, **TINY)).eval()
    wrapped = HCDiTTransformer2DModel.from_dit(dit, model_kwargs={"tanh": False, **TINY})
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, y).sample, dit(x, t, y))
    with pytest.raises(ValueError, match="computes differently"):  # tanh=False changes values, not shapes
        HCDiTTransformer2DModel.from_dit(dit, model_kwargs=TINY)
    with pytest.raises(ValueError, match="does not fit"):
        HCDiTTransformer2DModel.from_dit(dit, model_kwargs={"depth": 3})
    with pytest.raises(ValueError, match="sample_size=16"):
        HCDiTTransformer2DModel(DIGITS.format("res"), TINY, sample_size=16)


def _alphas_bar(num_train: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, num_train, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _reference_ddpm(model, labels, steps, generator, cfg_scale=1.0):
    """DDPM ancestral sampling on respaced steps with the learned variance (Improved DDPM Eqs. 11-15), from the
    equations; the noise is drawn in the scheduler's order (x_T, then one draw per step except the last)."""
    ab = _alphas_bar()
    ts = np.linspace(0, 999, steps).round()[::-1].astype(np.int64)
    n, c = len(labels), model.dit.in_chans
    x = torch.randn((n, c, 8, 8), generator=generator)
    y = torch.as_tensor(labels)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        abar, abar_prev = ab[t], (ab[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - abar / abar_prev  # the respaced beta_t
        with torch.no_grad():
            if cfg_scale != 1.0:
                out = model.dit(torch.cat([x, x]), torch.full((2 * n,), int(t)), torch.cat([y, torch.full_like(y, 10)]))
                cond, unc = out[:n], out[n:]
                out = torch.cat([unc[:, :c] + cfg_scale * (cond[:, :c] - unc[:, :c]), cond[:, c:]], dim=1)
            else:
                out = model.dit(x, torch.full((n,), int(t)), y)
        eps, v = out[:, :c].double(), out[:, c:].double()
        x0 = (x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
        mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0 + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)) * x
        beta_tilde = (1 - abar_prev) / (1 - abar) * beta
        frac = (v + 1) / 2
        log_var = frac * torch.log(beta) + (1 - frac) * torch.log(beta_tilde.clamp(min=1e-20))
        x = mean
        if prev >= 0:
            noise = torch.randn((n, c, 8, 8), generator=generator).double()
            x = mean + torch.exp(0.5 * log_var) * noise
        x = x.float()
    return x


def _reference_ddim(model, labels, steps, generator):
    """Deterministic DDIM (Song et al. Eq. 12, eta 0) on epsilon, the variance channels ignored, on ADM's ``ddimN``
    steps 0, 1000/N, ... with alpha_bar = 1 after the last."""
    ab = _alphas_bar()
    stride = 1000 // steps
    ts = (np.arange(steps) * stride)[::-1]
    n, c = len(labels), model.dit.in_chans
    x = torch.randn((n, c, 8, 8), generator=generator).double()
    for t in ts:
        abar = ab[t]
        abar_prev = ab[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
        with torch.no_grad():
            eps = model.dit(x.float(), torch.full((n,), int(t)), torch.as_tensor(labels))[:, :c].double()
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    return x.float()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_pixel_space_ddpm_learned_variance_matches_the_equations(cfg_scale):
    model = _randomize(HCDiTTransformer2DModel(DIGITS.format("dhc2"), TINY)).eval()
    pipe = HCDiTPipeline(model, dit_scheduler("ddpm"))
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 3, 9]
    out = pipe(labels, num_inference_steps=6, guidance_scale=cfg_scale, generator=torch.Generator().manual_seed(1),
               output_type="latent").images
    ref = _reference_ddpm(model, labels, 6, torch.Generator().manual_seed(1), cfg_scale)
    assert out.abs().max() > 0.1
    # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies float32 rounding by ~1/sqrt(abar_999) = 160 at the first
    # step, so the tolerance scales with the sample; a wrong variance or guidance is off by O(1) of it
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    imgs = pipe(labels, num_inference_steps=6, guidance_scale=cfg_scale, generator=torch.Generator().manual_seed(1),
                output_type="np").images
    assert imgs.shape == (3, 8, 8, 1) and imgs.min() >= 0 and imgs.max() <= 1
    np.testing.assert_allclose(imgs, (out * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_ddim_splits_the_learned_variance():
    model = _randomize(HCDiTTransformer2DModel(DIGITS.format("mhc2"), TINY)).eval()
    pipe = HCDiTPipeline(model, dit_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe([1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(2), output_type="latent").images
    ref = _reference_ddim(model, [1, 2], 5, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_any_scheduler_latent_space_with_vae_any_number_of_classes(tmp_path):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16).eval()
    # a 4-channel latent DiT with 7 classes on 8x8 latents (16x16 images)
    kwargs = dict(input_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=7)
    model = _randomize(HCDiTTransformer2DModel("dit_s_2_sfc2", kwargs)).eval()
    scheduler = dit_scheduler(EulerDiscreteScheduler)
    pipe = HCDiTPipeline(model, scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 6, 3]
    latents = pipe(labels, guidance_scale=1.5, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                   output_type="latent").images
    assert latents.shape == (3, 4, 8, 8) and torch.isfinite(latents).all()
    imgs = pipe(labels, guidance_scale=1.5, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                output_type="pt").images
    with torch.no_grad():
        decoded = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(imgs, decoded)
    assert imgs.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"0\.\.6"):
        pipe([7], num_inference_steps=2)
    # The pipeline saves and loads with diffusers' own loader; the same generator gives the same samples.
    pipe.save_pretrained(tmp_path / "pipe")
    back = HCDiTPipeline.from_pretrained(tmp_path / "pipe")
    back.set_progress_bar_config(disable=True)
    assert isinstance(back.scheduler, EulerDiscreteScheduler) and isinstance(back.transformer, HCDiTTransformer2DModel)
    again = back(labels, guidance_scale=1.5, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                 output_type="pt").images
    assert torch.equal(again, imgs)
    # DPM-Solver++ (2nd order) runs on epsilon; configured with a learned variance it would slice 3 channels: refused.
    pipe.scheduler = dit_scheduler(DPMSolverMultistepScheduler)
    assert pipe(labels, num_inference_steps=3, output_type="pt").images.shape == (3, 3, 16, 16)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(dit_scheduler().config)
    with pytest.raises(ValueError, match="slices the model output to 3 channels"):
        pipe(labels, num_inference_steps=3)


def test_pixel_pipeline_without_vae_round_trips(tmp_path):
    model = _randomize(HCDiTTransformer2DModel(DIGITS.format("dfc2"), TINY)).eval()
    pipe = HCDiTPipeline(model, dit_scheduler("ddpm"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    back = HCDiTPipeline.from_pretrained(tmp_path / "pipe")
    back.set_progress_bar_config(disable=True)
    assert back.vae is None
    kw = dict(num_inference_steps=3, generator=None, output_type="pil")
    a = pipe([4, 5], **{**kw, "generator": torch.Generator().manual_seed(4)}).images
    b = back([4, 5], **{**kw, "generator": torch.Generator().manual_seed(4)}).images
    assert [im.size for im in a] == [(8, 8), (8, 8)] and a[0].mode == "L"
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(a, b))
    assert not math.isnan(float(np.asarray(a[0]).mean()))


def _reference_flow_euler(model, labels, steps, generator):
    """Euler on dx/dt = v from t = 1 (noise) to 0 on t_i = 1 - i / N, the model called at 999 t (SiT's convention,
    written here from the equations)."""
    n, c = len(labels), model.dit.in_chans
    x = torch.randn((n, c, 8, 8), generator=generator)
    grid = np.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(grid[:-1], grid[1:]):
        with torch.no_grad():
            v = model.dit(x, torch.full((n,), float(np.float32(t)) * 999.0), torch.as_tensor(labels))[:, :c]
        x = x + float(np.float32(t_next) - np.float32(t)) * v
    return x


def test_flow_dit_with_diffusers_flow_scheduler_is_euler_on_the_velocity():
    """The call of a new user (a flow DiT, diffusers' FlowMatchEulerDiscreteScheduler as it comes) samples, gives PIL
    images by default, and is Euler on the velocity with the model called at 999 t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _randomize(HCDiTTransformer2DModel(DIGITS.format("shc2"), TINY, objective="flow")).eval()
    pipe = HCDiTPipeline(model, FlowMatchEulerDiscreteScheduler(), vae=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([0, 3, 7], num_inference_steps=5, generator=torch.Generator().manual_seed(5)).images
    assert len(images) == 3 and images[0].size == (8, 8) and images[0].mode == "L"
    out = pipe([0, 3, 7], num_inference_steps=5, generator=torch.Generator().manual_seed(5),
               output_type="latent").images
    ref = _reference_flow_euler(model, [0, 3, 7], 5, torch.Generator().manual_seed(5))
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="samples the 'ddpm' objective, not 'flow'"):
        pipe.scheduler = dit_scheduler("ddpm")
        pipe([0], num_inference_steps=2)


SAME_AS_CLI = [  # (objective, the pipeline's scheduler, sampler name passed to the pipeline, the CLI's sampler)
    ("ddpm", lambda: dit_scheduler("ddpm"), None, "ddpm"),
    ("ddpm", lambda: dit_scheduler("ddpm"), "dpmsolver++", "dpmsolver++"),
    ("flow", lambda: dit_scheduler("euler"), None, "euler"),
    ("flow", lambda: dit_scheduler("euler"), "heun", "heun"),
    ("flow", lambda: dit_scheduler("euler"), "sde", "sde"),
]


@pytest.mark.parametrize("objective,scheduler,sampler,cli_sampler", SAME_AS_CLI,
                         ids=[f"{o}-{c}" for o, _, _, c in SAME_AS_CLI])
def test_pipeline_gives_the_images_of_hcvision_sample(objective, scheduler, sampler, cli_sampler):
    """The pipeline and ``hcvision.sample`` (what the sampling CLI and train_dit run), same seed and sampler, with
    guidance on an interval: the same uint8 images."""
    from hcvision.sample import generate, sample_seed
    from hcvision.sampling_spec import SamplingSpec

    model = _randomize(HCDiTTransformer2DModel(DIGITS.format("dhc2"), TINY, objective=objective)).eval()
    pipe = HCDiTPipeline(model, scheduler())
    pipe.set_progress_bar_config(disable=True)
    n, seed, steps, guidance = 4, 7, 4, dict(guidance_scale=1.5, guidance_interval=(0.0, 0.7))
    labels = list(range(n))  # hcvision.sample's class-balanced labels for samples 0..n-1
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(n)]
    images = pipe(labels, num_inference_steps=steps, generator=gens, sampler=sampler, **guidance).images
    spec = SamplingSpec(sampler=cli_sampler, sampling_steps=steps, **guidance)
    cli, cli_labels = generate(model.dit, range(n), sample_shape=(1, 8, 8), num_classes=10, null_class=10,
                               sampling=spec, seed=seed, batch_size=n)
    assert cli_labels.tolist() == labels
    piped = np.stack([np.asarray(im) for im in images])[..., None]
    assert piped.dtype == np.uint8 and piped.shape == cli.shape == (n, 8, 8, 1)
    assert np.array_equal(piped, cli)
    # not a constant image (a random DDPM DiT's x_0 runs far outside [-1, 1]: most pixels clip to 0 or 255)
    assert len(np.unique(cli)) >= (3 if objective == "ddpm" else 20)
