"""The trainers as a user meets them: --help, recipe names, checked model arguments, eval_only from a run's record,
and an unreachable Hub refused at once."""
from __future__ import annotations

import dataclasses
import json

import pytest

from hcvision import train_cls, train_dit
from hcvision.cli import UsageError
from hcvision.engine import ConfigError, parse_config
from hcvision.engine.help import GROUPS, config_keys
from hcvision.models.arguments import check_model_kwargs
from hcvision.resources import list_recipes, resolve_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model_kwargs.embed_dim=32", "model_kwargs.depth=2", "progress_bar=false", "tensorboard=false"]


# ---------------------------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", [train_cls, train_dit])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_type_default_and_range(trainer, flag, capsys):
    assert trainer.main([flag]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(trainer.CONFIG):
        assert f"\n  {f.name} " in out, f.name
    own, other = ("digits_dhc2", "dit_digits_shc2") if trainer is train_cls else ("dit_digits_shc2", "digits_dhc2")
    assert "--config RECIPE|FILE" in out and "model_kwargs.NAME=V" in out
    assert f" {own}," in out and f" {other}," not in out  # each trainer lists its own recipes
    assert [g for g in GROUPS if f"\n{g}:\n" in out] == [g for g in GROUPS if g != "diffusion" or trainer is train_dit]
    # A field declared in the base with a range keeps it when the trainer only changes its default (lr).
    assert "  lr " in out and "accepted: a finite number > 0" in out.split("\n  lr ")[1].splitlines()[0]


def test_help_groups_and_texts_come_from_the_declarations():
    keys = {k.name: k for k in config_keys(train_dit.CONFIG)}
    expected = {"model": "model", "model_kwargs": "model", "data_dir": "data", "lr": "optimisation",
                "ema_decay": "optimisation", "objective": "diffusion", "sampling_steps": "evaluation",
                "output_dir": "run", "cpu_threads": "run", "checkpoint_every": "run"}
    assert {name: keys[name].group for name in expected} == expected
    assert keys["epochs"].default == "100" and keys["epochs"].accepted == "an integer >= 1"
    assert "2,200 updates" in keys["epochs"].text  # the trainer's own comment wins over the base's
    assert "optimiser steps between checkpoints" in keys["checkpoint_every"].text  # a comment above the field
    assert all(k.group in GROUPS for k in keys.values())


def test_help_is_printed_before_any_other_argument_is_checked(capsys):
    assert train_cls.main(["no_such_key=1", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Recipe names
# ---------------------------------------------------------------------------------------------------------------
def test_recipe_names_resolve_and_are_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout
    recipes = list_recipes()
    assert {"digits_dhc2", "digits_res", "dit_digits_shc2", "sit_b_2_res"} <= set(recipes)
    stems = [p.stem for p in recipes.values()]
    assert len(stems) == len(set(stems))
    assert resolve_recipe("digits_dhc2") == recipes["digits_dhc2"]
    assert resolve_recipe("configs/cls/digits_dhc2.yaml") == recipes["digits_dhc2"]  # the README's path, any cwd
    assert resolve_recipe("dit/flow/sit_b_2_res", "dit") == recipes["sit_b_2_res"]
    cfg = parse_config(train_cls.CONFIG, ["--config", "digits_res"])
    assert cfg.model == "vit_digits_patch2_8_res"
    with pytest.raises(ConfigError, match="not a recipe name; accepted: a YAML file, or one of digits_dhc2"):
        parse_config(train_cls.CONFIG, ["--config", "digits_dhc3"])
    # A mistyped path never falls back to a recipe of the same stem.
    for typo in ("/home/me/typo/digits_dhc2.yaml", "digits_dhc2.json", "dit/digits_dhc2",
                 "configs/dit/digits_res.yaml"):
        with pytest.raises(UsageError, match="does not exist as a file and is not a recipe name"):
            resolve_recipe(typo)
    # Each trainer takes its own recipes and says whose another one is.
    with pytest.raises(ConfigError, match="'dit_digits_shc2' is a recipe of hcvision.train_dit, not of this trainer"):
        parse_config(train_cls.CONFIG, ["--config", "dit_digits_shc2"])


# ---------------------------------------------------------------------------------------------------------------
# Model arguments
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,needle", [
    ("model_kwargs.qk_norm=maybe", "model_kwargs.qk_norm='maybe' has type str; expected bool"),
    ("model_kwargs.qk_nrom=true", "model_kwargs.qk_nrom is not an argument of model='vit_digits_patch2_8_dhc2'; "
                                  "close names: qk_norm"),
    ("model_kwargs.num_heads=2.5", "model_kwargs.num_heads=2.5 has type float; expected int"),
    ("model_kwargs.global_pool=mean", "expected one of '', 'avg'"),
    ("model_kwargs.norm_layer=[1]", "model_kwargs.norm_layer=[1]"),
    ("model_kwargs.embed_layer=conv", "takes a Python object"),
    ("model_kwargs.tanh=sometimes", "model_kwargs.tanh='sometimes'"),  # an hcvision argument (Optional[bool])
])
def test_bad_model_argument_is_exit_2_before_anything_is_written(tmp_path, capsys, arg, needle):
    out = tmp_path / "run"
    assert train_cls.main([arg, f"output_dir={out}", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("arg,needle", [
    ("model_kwargs.img_size=7", "takes 1x7x7 images, but the embedded digits (data_dir='') are 1x8x8"),
    ("model_kwargs.in_chans=2", "takes 2x8x8 images"),
    ("model=vit_tiny_patch16_224_dhc2", "takes 3x224x224 images"),
    ("model_kwargs.act_layer=bogus", "cannot be built with model_kwargs act_layer='bogus'"),
])
def test_a_model_that_cannot_take_the_digits_is_refused_before_anything_is_written(tmp_path, capsys, arg, needle):
    out = tmp_path / "run"
    assert train_cls.main([arg, f"output_dir={out}", "progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_bad_dit_and_encoder_arguments_are_refused(tmp_path, capsys):
    assert train_dit.main(["model_kwargs.learn_sigma=2", f"output_dir={tmp_path / 'a'}"]) == 2
    assert "model_kwargs.learn_sigma=2 has type int; expected bool" in capsys.readouterr().err
    assert train_dit.main(["repa_encoder_kwargs.depht=2", f"output_dir={tmp_path / 'b'}"]) == 2
    assert "repa_encoder_kwargs.depht is not an argument of model='vit_base_patch14_dinov2'; close names: depth" \
        in capsys.readouterr().err
    assert train_dit.main(["model_kwargs.class_dropout_prob=0", f"output_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert "set by the trainer's class_dropout_prob; accepted: class_dropout_prob=0.0 instead" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_good_model_arguments_are_converted_to_their_types():
    got = check_model_kwargs("vit_digits_patch2_8_dhc2", {"img_size": [8, 8], "mlp_ratio": 2, "qk_norm": "true",
                                                          "connection_options": {"tanh": False}, "drop_rate": 0})
    assert got == {"img_size": (8, 8), "mlp_ratio": 2.0, "qk_norm": True, "connection_options": {"tanh": False},
                   "drop_rate": 0.0}
    assert isinstance(got["mlp_ratio"], float) and isinstance(got["img_size"], tuple)
    assert check_model_kwargs("dit_digits_2_shc2", {"scriptable": True}) == {"scriptable": True}  # create_model's


# ---------------------------------------------------------------------------------------------------------------
# eval_only reads the run
# ---------------------------------------------------------------------------------------------------------------
def test_eval_only_takes_the_model_the_run_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cls.main(["model=vit_digits_patch2_8_res", f"output_dir={run}", "epochs=1", "max_steps=2",
                           "checkpoint_every=2", *TINY]) == 0
    trained = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    for checkpoint in (run, run / "model.safetensors", *sorted((run / "checkpoints").glob("step_*"))):
        assert train_cls.main(["eval_only=true", f"checkpoint={checkpoint}", "progress_bar=false"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["model"] == "vit_digits_patch2_8_res" and line["top1"] == pytest.approx(trained["top1"])
    # model= given and the same, from the command line or a recipe: the run's kwargs (its width, depth) still apply.
    for given in (["model=vit_digits_patch2_8_res"], ["--config", "digits_res"]):
        assert train_cls.main(["eval_only=true", f"checkpoint={run}", "progress_bar=false", *given]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["top1"] == pytest.approx(trained["top1"])
    # A config built in code (no parse_config): nothing was "given", the recorded model is used.
    cfg = train_cls.CONFIG(eval_only=True, checkpoint=str(run), progress_bar=False)
    assert cfg.given_keys == frozenset() and train_cls.run(cfg) == 0 and cfg.model == "vit_digits_patch2_8_res"
    capsys.readouterr()
    # model= given and different: exit 2 naming both.
    assert train_cls.main(["eval_only=true", f"checkpoint={run}", "model=vit_digits_patch2_8_dhc2"]) == 2
    err = capsys.readouterr().err
    assert "model='vit_digits_patch2_8_dhc2' does not match" in err and "'vit_digits_patch2_8_res'" in err


# ---------------------------------------------------------------------------------------------------------------
# An unreachable Hub is refused at once
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["hf-hub:someone/some-model", "vit_small_patch16_224.augreg_in21k"])
def test_unreachable_hub_is_refused_without_a_download_attempt(monkeypatch, tmp_path, spec):
    import huggingface_hub
    from huggingface_hub import constants

    from hcvision import pretrained

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    attempts = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: attempts.append(a) or "/nowhere")
    with pytest.raises(UsageError, match=r"did not answer within 5 s\); accepted offline: a local file"):
        pretrained.resolve_pretrained(spec)
    assert attempts == []


def test_offline_variable_refuses_without_probing(monkeypatch, tmp_path):
    from hcvision import pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probes = []
    monkeypatch.setattr(pretrained, "_answers", lambda url, timeout=0: probes.append(url) or True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        pretrained.resolve_pretrained("hf-hub:someone/not-cached-here")
    assert probes == []


def test_probe_goes_through_the_proxy_when_one_is_set(monkeypatch):
    """Behind HTTPS_PROXY the proxy is what must answer (as for the download); without one, the host itself."""
    import socket

    from hcvision.pretrained import _answers

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    port = listening.getsockname()[1]
    try:
        for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        assert _answers(f"https://127.0.0.1:{port}") and not _answers("https://127.0.0.1:9")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        assert _answers("https://127.0.0.1:9")  # the proxy answers for the host
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
        assert not _answers(f"https://hub.invalid:{port}")
    finally:
        listening.close()
