"""Unit tests of hcvision.engine: config parsing, batch arithmetic, LR schedule, checkpoints, signals."""
from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch

from hcvision.cli import UsageError
from hcvision.engine import (
    BaseTrainConfig,
    CheckpointManager,
    ConfigError,
    SignalGuard,
    TrainState,
    check_output_dir,
    coerce_value,
    lr_factor,
    parse_config,
    per_device_batch_size,
    save_config,
    step_seed,
    steps_per_epoch,
)
from hcvision.engine.config import checked, load_yaml
from hcvision.eval.classification import TopKAccumulator, topk_accuracy, topk_correct, topk_hits
from hcvision.io import load_weights, save_safetensors, write_json


@dataclass
class _Cfg(BaseTrainConfig):
    model: str = "resnet18"
    data_dir: str = ""
    maybe: Optional[int] = None
    pair: Tuple[float, float] = (1.0, 2.0)


# -- config -------------------------------------------------------------------------------------
def test_parse_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 3e-3\nepochs: 7\nmodel_kwargs:\n  qk_norm: true\n  depth: 2\nbetas: [0.9, 0.95]\n")
    # An unregistered model: its kwargs are not checked here (the trainer refuses the name), so any merge shows.
    cfg = parse_config(_Cfg, ["--config", str(y), "epochs=9", "model_kwargs.depth=3", "model_kwargs.a.b=x",
                              "maybe=null", "ema=true", "pair=[3, 4]", "model=toy_unregistered"])
    assert cfg.lr == pytest.approx(3e-3) and isinstance(cfg.lr, float)  # YAML 1.1 reads 3e-3 as a string
    assert cfg.epochs == 9  # CLI beats the file
    assert cfg.model_kwargs == {"qk_norm": True, "depth": 3, "a": {"b": "x"}}  # nested keys merge
    assert cfg.betas == (0.9, 0.95) and cfg.pair == (3.0, 4.0)
    assert cfg.maybe is None and cfg.ema is True


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key .wieght_decay.; did you mean") as e:
        parse_config(_Cfg, ["wieght_decay=0.1"])
    assert "'weight_decay'" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'global_batch_size'"):
        parse_config(_Cfg, ["global_batchsize=8"])


@pytest.mark.parametrize("arg,expected", [
    ("epochs=1.5", "expected int"),
    ("epochs=true", "expected int"),  # a bool is not a number to a user
    ("lr=fast", "expected float"),
    ("ema=maybe", "expected bool"),
    ("betas=[0.9]", "a list of 2 values"),
    ("model_kwargs=3", "expected a mapping"),
])
def test_wrong_type_names_expected_type(arg, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(_Cfg, [arg])


@pytest.mark.parametrize("arg,accepted", [
    ("lr=-0.1", "a finite number > 0"),
    ("lr=inf", "a finite number > 0"),
    ("mixed_precision=fp8", "one of ('no', 'bf16', 'fp16')"),
    ("epochs=0", "an integer >= 1"),
    ("lr_schedule=step", "'cosine', 'constant'"),
    ("opt=adamww", "did you mean 'adamw'"),
    ("resume=/does/not/exist", "'auto'"),
    ("min_lr=1", "[0, lr="),
])
def test_bad_values_name_what_is_accepted(arg, accepted):
    with pytest.raises(ConfigError) as e:
        parse_config(_Cfg, [arg])
    assert accepted in str(e.value)
    assert arg.split("=")[0] in str(e.value)


def test_bad_cli_and_yaml_shapes(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_config(_Cfg, ["epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(_Cfg, ["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not a mapping"):
        parse_config(_Cfg, ["epochs.x=1"])


def test_coerce_value_rules():
    assert coerce_value("k", "7", int) == 7
    assert coerce_value("k", 2, float) == 2.0 and isinstance(coerce_value("k", 2, float), float)
    assert coerce_value("k", "None", Optional[int]) is None
    with pytest.raises(ConfigError, match="k=True has type bool; expected float"):
        coerce_value("k", True, float)


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(_Cfg, ["model_kwargs.drop_rate=0.25", "betas=[0.8, 0.9]", "lr=0.01"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = parse_config(_Cfg, ["--config", str(tmp_path / "out" / "config.yaml")])
    assert again == cfg
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]  # no temp file left


# -- batch arithmetic, schedule, seeds ------------------------------------------------------------
def test_per_device_batch_keeps_global_batch():
    assert per_device_batch_size(4096, 8, 4) == 128
    assert per_device_batch_size(32, 2, 1) == 16
    with pytest.raises(ConfigError, match=r"global_batch_size=30 is not divisible .* = 4"):
        per_device_batch_size(30, 2, 2)


def test_lr_factor_warmup_cosine_constant():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    mid = 10 + 45 * 0.5
    assert lr_factor(int(mid), 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 90)))
    with pytest.raises(ValueError, match="'step'"):
        lr_factor(0, 10, 0, "step")


def test_steps_per_epoch_counts_short_window():
    assert steps_per_epoch(89, 2) == 45 and steps_per_epoch(88, 2) == 44 and steps_per_epoch(5, 1) == 5


def test_step_seed_depends_on_every_input():
    s = step_seed(0, 10, 0)
    assert s == step_seed(0, 10, 0)
    assert len({s, step_seed(1, 10, 0), step_seed(0, 11, 0), step_seed(0, 10, 1)}) == 4
    assert 0 <= s < 2**63


# -- checkpoint plumbing ----------------------------------------------------------------------
class _FakeAccelerator:
    """Single-process stand-in recording what save_state/load_state receive."""

    is_main_process = True
    num_processes = 1

    def __init__(self):
        self.loaded = None

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        save_safetensors({"w": torch.ones(2)}, Path(path) / "model.safetensors")

    def load_state(self, path):
        self.loaded = path


def test_checkpoint_manager_atomic_latest_and_prune(tmp_path):
    acc = _FakeAccelerator()
    mgr = CheckpointManager(acc, tmp_path, keep=2)
    assert mgr.latest() is None and mgr.resolve("auto") is None and mgr.resolve("") is None
    for step in (5, 10, 15):
        mgr.save(TrainState(global_step=step, epoch=1), ema_state={"e": torch.full((2,), float(step))})
    assert [p.name for p in mgr.list()] == ["step_00000010", "step_00000015"]
    # A half-written checkpoint (crash during save) is never picked up.
    (tmp_path / "checkpoints" / ".tmp-step_00000020").mkdir()
    (tmp_path / "checkpoints" / "step_00000025").mkdir()  # no train_state.json: incomplete
    assert mgr.latest().name == "step_00000015"
    state, ema = mgr.load(mgr.resolve("auto"))
    assert state == TrainState(global_step=15, epoch=1)
    assert torch.equal(ema["e"], torch.full((2,), 15.0))
    assert acc.loaded.endswith("step_00000015")
    # Saving a step that leaves a stale temp dir behind replaces it cleanly.
    (tmp_path / "checkpoints" / ".tmp-step_00000030").mkdir()
    mgr.save(TrainState(global_step=30))
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000030").exists()
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        mgr.resolve(str(tmp_path))


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "new", resume="")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", resume="")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run.*resume=auto"):
        check_output_dir(tmp_path / "run", resume="")
    check_output_dir(tmp_path / "run", resume="auto")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        check_output_dir(tmp_path / "file", resume="")


def test_atomic_writers_and_safe_loading(tmp_path):
    write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    save_safetensors({"x": torch.arange(3.0)}, tmp_path / "w.safetensors", metadata={"k": "v"})
    assert torch.equal(load_weights(tmp_path / "w.safetensors")[0]["x"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "w.safetensors"]
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UsageError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")


def test_signal_guard_turns_signals_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with SignalGuard() as guard:
        assert guard.received is None
        signal.raise_signal(signal.SIGTERM)
        assert guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


# -- top-k metrics --------------------------------------------------------------------------------
def test_topk_correct_against_manual_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # target 1: top-1 hit
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # target 4: 5th -> top-5 hit only
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # target 5: 6th -> miss
                           [0.0, 0.1, 0.2, 0.9, 0.3, 0.4]])  # target 5: 2nd -> top-5 hit
    targets = torch.tensor([1, 4, 5, 5])
    assert topk_correct(logits, targets, (1, 2, 5)).tolist() == [1, 2, 3]
    assert topk_hits(logits, targets, (1, 5)).tolist() == [[True, True], [False, True], [False, False], [False, True]]
    assert topk_accuracy(logits, targets) == {"top1": 25.0, "top5": 75.0}
    acc = TopKAccumulator()
    acc.update(logits[:2], targets[:2])
    acc.update(logits[2:], targets[2:])
    assert acc.compute() == {"top1": 25.0, "top5": 75.0, "num_samples": 4}
    # Fewer classes than k: every sample counts.
    assert topk_correct(torch.randn(3, 2), torch.tensor([0, 1, 1]), (5,)).tolist() == [3]
    with pytest.raises(ValueError, match="targets shape"):
        topk_correct(logits, targets[:2])


def test_connection_lr_scale_puts_connection_parameters_in_scaled_groups():
    import timm

    import hcvision  # noqa: F401
    from hcvision.connections import Connection
    from hcvision.engine import build_optimizer

    model = timm.create_model("vit_digits_patch2_8_dhc2", embed_dim=32, depth=2)
    conn = {id(p) for m in model.modules() if isinstance(m, Connection) for p in m.parameters()}
    no_decay = set(model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = _Cfg(model="vit_digits_patch2_8_dhc2", lr=1e-3, weight_decay=0.05, connection_lr_scale=0.1)
    opt = build_optimizer(model, cfg)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(1e-4 if id(p) in conn else 1e-3)
            decayed = p.ndim > 1 and names[id(p)] not in no_decay
            assert g["weight_decay"] == (0.05 if decayed else 0.0), names[id(p)]
    assert conn and any(g["lr"] == pytest.approx(1e-4) for g in opt.param_groups)
    # Scale 1 keeps timm's own grouping (identical to the default call).
    plain = build_optimizer(model, _Cfg(model="vit_digits_patch2_8_dhc2", lr=1e-3, weight_decay=0.05))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def test_run_logs_world_size_and_warns_when_the_launcher_started_fewer_processes(tmp_path, monkeypatch, capsys):
    from hcvision.engine import Run

    cfg = _Cfg(output_dir=str(tmp_path / "run"), global_batch_size=8, grad_accum_steps=2, tensorboard=False)
    with Run(cfg, "train_x") as run:
        run._check_launch()
    err = capsys.readouterr().err
    assert "1 process(es) on cpu, per-device batch 4 x 2 accumulation = global batch 8" in err
    assert "warning" not in err
    # What `accelerate launch --cpu --num_processes 2` leaves in the environment of the one process it starts.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with Run(cfg, "train_x") as run:
        run._check_launch()
    assert "warning: the launcher asked for several processes but 1 started" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing is written before the trainer is set up


def test_checked_ranges_survive_a_subclass_default():
    """A subclass that only changes a default (``epochs: int = 15`` in train_cls.py) keeps the base's range."""

    @dataclass
    class _Sub(_Cfg):
        epochs: int = 15
        ratio: float = checked(0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]")

    assert parse_config(_Sub, []).epochs == 15
    with pytest.raises(ConfigError, match=r"epochs=0 is not valid; expected an integer >= 1"):
        parse_config(_Sub, ["epochs=0"])
    with pytest.raises(ConfigError, match=r"ratio=1.5 is not valid; expected a number in \[0, 1\]"):
        parse_config(_Sub, ["ratio=1.5"])
    with pytest.raises(ConfigError, match=r"betas=\[0.9, 1.0\] is not valid"):  # tuples shown as the list one types
        parse_config(_Sub, ["betas=[0.9, 1.0]"])


def test_run_that_read_no_sample_is_a_usage_error_and_writes_no_results(tmp_path):
    """Every batch unreadable (the loss counts 0 samples): exit 2 territory, not a results.json for an untrained
    model."""
    from hcvision.engine import Run

    cfg = _Cfg(output_dir=str(tmp_path / "run"), global_batch_size=2, epochs=1, tensorboard=False,
               progress_bar=False, diagnostics=False, data_dir="some/folder")
    model = torch.nn.Linear(2, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    with Run(cfg, "train_x") as run:
        trainer = run.trainer(model, loader, lambda m, batch: ((m(batch[0]) * 0.0).sum(), 0))
        with pytest.raises(ConfigError, match=r"no training sample of data_dir='some/folder' could be read"):
            run.fit(trainer)
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_layer_decay_scales_each_layer_like_beit_and_composes_with_the_connection_scale():
    """``layer_decay=d`` on a depth-3 DHC ViT: patch embedding / cls token / position embedding at d^4, block i at
    d^(3-i), final norm and head at 1 (BEiT's layer-wise decay, timm's --layer-decay), each connection parameter at its
    block's scale times connection_lr_scale; weight decay as without it."""
    import timm

    import hcvision  # noqa: F401
    from hcvision.connections import Connection
    from hcvision.engine import build_optimizer

    d, depth, lr = 0.5, 3, 1e-3
    model = timm.create_model("vit_digits_patch2_8_dhc2", embed_dim=32, depth=depth)
    conn = {id(p) for m in model.modules() if isinstance(m, Connection) for p in m.parameters()}
    opt = build_optimizer(model, _Cfg(model="vit_digits_patch2_8_dhc2", lr=lr, weight_decay=0.05, layer_decay=d,
                                      connection_lr_scale=0.1))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    plain = build_optimizer(model, _Cfg(model="vit_digits_patch2_8_dhc2", lr=lr, weight_decay=0.05))
    plain_wd = {id(p): g["weight_decay"] for g in plain.param_groups for p in g["params"]}
    assert sorted(lr_of) == sorted(id(p) for p in model.parameters())
    for name, p in model.named_parameters():
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            scale = d ** (depth + 1)
        elif name.startswith("blocks."):
            scale = d ** (depth - int(name.split(".")[1]))
        else:  # norm, head and anything after the blocks
            scale = 1.0
        expected = lr * scale * (0.1 if id(p) in conn else 1.0)
        assert lr_of[id(p)] == pytest.approx(expected), name
        assert wd_of[id(p)] == plain_wd[id(p)], name
    with pytest.raises(ConfigError, match=r"layer_decay=0.0 is not valid; expected a number in \(0, 1\]"):
        parse_config(_Cfg, ["layer_decay=0"])
