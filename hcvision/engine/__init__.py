"""The run: config, accelerator, batch arithmetic, EMA, checkpoints, trackers, results and exit codes.

A training script (``train_cls.py``, ``train_dit.py``) keeps its config class, data, loss and what happens after
training; everything else is here. In outline::

    @dataclass
    class MyConfig(BaseTrainConfig):          # task fields; validate() rejects out-of-range values
        data_dir: str = ""

    def run(cfg: MyConfig) -> int:
        with Run(cfg, "train_my") as run:      # output_dir checked, accelerator, per-device batch, world size logged
            model = timm.create_model(cfg.model)
            loader = DataLoader(data, batch_size=run.batch_size, shuffle=True, drop_last=True)
            trainer = run.trainer(model, loader, loss_fn)   # resume validated before config.yaml is written
            if (result := run.fit(trainer)) is None:
                return run.exit_code                       # 1 non-finite loss, 128+N signal (checkpointed)
            run.save_weights({"model": cfg.model, ...})
            run.write_results({...})
        return 0

    if __name__ == "__main__":
        sys.exit(train_main(MyConfig, run, None, "train_my.py"))   # ConfigError -> one line, exit 2

``loss_fn(model, batch) -> (mean loss over the local batch, local batch size)``. Each micro-step reseeds the
global RNGs from (seed, step, rank), so dropout/noise/timestep draws resume exactly.
"""
from ..models.loading import check_model_name
from .accel import (
    build_accelerator,
    per_device_batch_size,
    release_accelerator,
    reseed_for_step,
    seed_everything,
    step_seed,
)
from .checkpoint import CheckpointManager, TrainState, check_output_dir, validate_resume
from .config import (
    BaseTrainConfig,
    ConfigError,
    checked,
    coerce_value,
    config_to_dict,
    load_yaml,
    parse_config,
    require,
    save_config,
)
from .ema import create_ema, ema_state_dict, load_ema_state_dict
from .logging import MetricsLogger, ProgressBar, ThroughputMeter
from .loop import (
    FitResult,
    NonFiniteLossError,
    SignalGuard,
    Trainer,
    build_optimizer,
    fit_to_exit_code,
    lr_factor,
    steps_per_epoch,
)
from .run import Run, train_main

__all__ = [
    "BaseTrainConfig", "ConfigError", "checked", "require", "check_model_name", "coerce_value", "config_to_dict",
    "load_yaml", "parse_config", "save_config", "build_accelerator", "release_accelerator", "per_device_batch_size",
    "reseed_for_step", "seed_everything", "step_seed", "CheckpointManager", "TrainState", "check_output_dir",
    "validate_resume", "create_ema", "ema_state_dict", "load_ema_state_dict", "MetricsLogger", "ProgressBar",
    "ThroughputMeter", "FitResult", "fit_to_exit_code", "NonFiniteLossError", "SignalGuard", "Trainer",
    "build_optimizer", "lr_factor", "steps_per_epoch", "Run", "train_main",
]
