"""Every option of every config group composes and instantiates in-process (no subprocess, no weights).

As lightning-hydra-template's ``tests/test_configs.py``: each ``conf/<group>/<option>.yaml`` is
composed over the defaults, its range checks run (:func:`validate_run_settings`), and what builds
itself from ``_target_`` is instantiated: the backend object, the objective, the optimizer settings,
the logger factory, the data module (a letter tokenizer and a few documents, packed) and the callbacks.
Options that only make sense with others (a megatron parallel layout, real-donor presets) get those
others; a settings error is a failure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from splitllama.results import register_run_dir_resolver
from splitllama.backend.spec import BackendSpec, backend_spec
from splitllama.training.callbacks import GracefulStop, make_loggers
from splitllama.training.data import SplitTextDataModule
from splitllama.training.module import OptimSettings
from splitllama.training.objectives import Objective
from splitllama.errors import RunConfigError
from splitllama.run.schema import register_configs
from splitllama.run.settings import validate_run_settings
from splitllama.run.data import make_datamodule
from splitllama.run.trainer import make_callbacks
from tests.conftest import REPO, compose_run_config
from tests.donors import letter_tokenizer

@pytest.fixture(autouse=True)
def environment_unchanged() -> Iterator[None]:
    """No test here may leave the process environment changed: a variable set by the code under
    test (``os.environ.setdefault``) reaches every later test and every subprocess it starts."""
    before = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    yield
    after = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"the test left the environment changed (before, after): {changed}"


#: the groups conf/config.yaml's defaults list names
DEFAULTS = {next(iter(entry)) for entry in OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "config.yaml").defaults)
            if isinstance(entry, dict)}
GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "hydra")
#: what an option needs beside itself to be valid
NEEDS = {
    "parallel": {name: ("backend=megatron",) for name in ("tp2", "tp2_sp", "tp2_dp2", "pp2", "tp2_pp2")},
    "experiment": {"megatron_multinode": ("backend=megatron",)},
    # the embedded donors must have learned the other corpus than the one a run validates on
    "data": {"stdlib_docs": ("donors.embedded.corpus=stdlib_docstrings",)},
}
#: presets of real donors: their paths are required (``???``); given as empty directories here
REAL_DONORS = ("llama3_8b_70b", "llama31_8b_70b", "llama32_1b_3b", "smollm2_135m_360m")
#: a few documents of the letter tokenizer's letters, each longer than any option's data.seq_len
DOCUMENTS = ["".join("abcdefgh"[(i * 5 + j * (i % 3 + 1)) % 8] for j in range(300 + i)) for i in range(40)]


def compose_as_run(run_dir: Path, *overrides: str):
    """The config as run.py sees it: Hydra's own config set, so ``${hydra:...}`` paths resolve."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    register_run_dir_resolver()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):  # what Hydra's launcher fills in for a job
        cfg.hydra.job.num, cfg.hydra.job.id = 0, "test"
        cfg.hydra.runtime.output_dir, cfg.hydra.runtime.cwd = str(run_dir), str(REPO)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _options() -> list[tuple[str, str]]:
    return [(group, p.stem) for group in GROUPS for p in sorted((REPO / "conf" / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda v: v)
def test_config_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    plus = "" if group in DEFAULTS else "+"  # a group outside config.yaml's defaults list is appended
    overrides = [f"{plus}{group}={option}", *NEEDS.get(group, {}).get(option, ())]
    if group == "donors" and option in REAL_DONORS:
        for key in ("path8b", "path70b"):
            (tmp_path / key).mkdir()
            overrides.append(f"donors.{key}={tmp_path / key}")
    if group == "task" and option in ("eval", "generate"):
        overrides.append(f"task.model_dir={tmp_path}")
    if group == "data" and option == "files":
        (tmp_path / "a.txt").write_text("\n\n".join(DOCUMENTS))
        overrides.append(f"data.files=[{tmp_path / 'a.txt'}]")
    cfg = compose_as_run(tmp_path / "run", *overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves (Hydra's own included)
    validate_run_settings(cfg)
    backend = backend_spec(cfg)
    assert isinstance(backend, BackendSpec) and backend.name == cfg.backend.name
    objective = instantiate(cfg.objective)
    assert isinstance(objective, Objective) and objective.kind == cfg.objective.kind.name
    optim = instantiate(cfg.optim, _convert_="all", total_steps=cfg.trainer.max_steps)
    assert isinstance(optim, OptimSettings) and optim.lr == cfg.optim.lr and len(optim.betas) == 2
    assert instantiate(cfg.logger, _partial_=True).func is make_loggers
    _check_data_module(cfg, tmp_path)
    _check_callbacks(cfg)


def _check_data_module(cfg, tmp_path: Path) -> None:  # noqa: ANN001
    """``data``'s ``_target_`` builds the data module, which packs the documents into blocks of ``data.seq_len``."""
    if cfg.data.files:  # the run's own wiring, reading the file
        with open_dict(cfg):
            cfg.paths.cache_dir = str(tmp_path / "cache")
        data = make_datamodule(cfg, letter_tokenizer())
    else:  # the stdlib corpora: given a few documents instead
        data = instantiate(cfg.data, _partial_=True, _convert_="all")(
            tokenizer=letter_tokenizer(), documents=DOCUMENTS, train_steps=cfg.trainer.max_steps, seed=cfg.seed, progress=False)
    assert isinstance(data, SplitTextDataModule)
    assert (data.seq_len, data.batch_size, data.train_steps) == (cfg.data.seq_len, cfg.data.batch_size, cfg.trainer.max_steps)
    data.setup("fit")
    assert data.train_blocks.shape[1] == data.val_blocks.shape[1] == cfg.data.seq_len and len(data.val_blocks) > 0


def _check_callbacks(cfg) -> None:  # noqa: ANN001
    """``callbacks``: checkpoints every ``trainer.checkpoint_every_n_steps`` and the clean stop at ``task.stop_after_steps``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint, stop = make_callbacks(cfg, signals=None)
    assert isinstance(checkpoint, ModelCheckpoint) and isinstance(stop, GracefulStop)
    assert checkpoint.dirpath == str(Path(cfg.paths.checkpoint_dir).resolve())
    assert checkpoint._every_n_train_steps == cfg.trainer.checkpoint_every_n_steps and checkpoint.save_last
    assert stop.checkpoint_path == str(Path(cfg.paths.checkpoint_dir) / "last.ckpt") and stop.steps == cfg.task.stop_after_steps


def test_callbacks_read_their_settings_and_get_the_run_signals(tmp_path: Path) -> None:
    """The callbacks' settings keep their overrides; GracefulStop watches the run's own signal handler."""
    from splitllama.results import RunSignals

    cfg = compose_as_run(tmp_path / "run", "task.stop_after_steps=3", "trainer.checkpoint_every_n_steps=2")
    signals = RunSignals()
    checkpoint, stop = make_callbacks(cfg, signals)
    assert stop.signals is signals and stop.steps == 3 and checkpoint._every_n_train_steps == 2


def test_extra_callbacks_from_the_command_line_come_after_the_built_in_ones(tmp_path: Path) -> None:
    """``+callbacks.extra.<name>._target_=...`` adds a Lightning callback (as lightning-hydra-template's
    callbacks group does); a target that is not a class fails at validation, naming the field."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor

    cfg = compose_as_run(tmp_path / "run", "+callbacks.extra.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
                         "+callbacks.extra.lr.logging_interval=step",
                         "+callbacks.extra.stop._target_=lightning.pytorch.callbacks.EarlyStopping", "+callbacks.extra.stop.monitor=val/loss")
    validate_run_settings(cfg)
    checkpoint, stop, lr, early = make_callbacks(cfg, signals=None)
    assert isinstance(stop, GracefulStop) and isinstance(lr, LearningRateMonitor) and isinstance(early, EarlyStopping)
    assert lr.logging_interval == "step" and early.monitor == "val/loss"
    for bad, named in (("+callbacks.extra.x._target_=lightning.pytorch.callbacks.NoSuchCallback", "callbacks.extra.x._target_"),
                       ("+callbacks.extra.x.monitor=val/loss", "callbacks.extra.x=")):
        with pytest.raises(RunConfigError, match=re.escape(named)):
            validate_run_settings(compose_as_run(tmp_path / "bad", bad))


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_backend_object_owns_its_settings(backend: str) -> None:
    """What differs between backends comes from the object ``conf/backend/<name>.yaml`` builds."""
    spec = backend_spec(compose_run_config(f"backend={backend}"))
    megatron = backend == "megatron"
    assert (spec.builds_per_rank, spec.runs_own_schedule, spec.shards_with_fsdp) == (megatron, megatron, not megatron)
    assert set(spec.part_prefixes) == {"adapter", "first", "last", "embeddings", "norm", "head", "all"}
    assert spec.part_prefixes["adapter"] == (("module." if megatron else "") + "model.adapter.",)


#: megatron's sizes (backend.tp, pp, sp, micro_batch_size) as a parallel layout or the command line sets them
MEGATRON_SIZES = [
    (("parallel=tp2",), (2, 1, False, None)),
    (("parallel=tp2_sp",), (2, 1, True, None)),
    (("parallel=pp2",), (1, 2, False, 1)),
    (("parallel=tp2_dp2",), (2, 1, False, None)),
    (("parallel=tp2_pp2",), (2, 2, False, 1)),
    (("backend.tp=2", "parallel.devices=2"), (2, 1, False, None)),
    (("parallel=tp2_pp2", "backend.pp=1", "backend.micro_batch_size=2"), (2, 1, False, 2)),  # the command line wins
]


@pytest.mark.parametrize(("overrides", "sizes"), MEGATRON_SIZES, ids=[" ".join(o) for o, _ in MEGATRON_SIZES])
def test_megatron_sizes_live_in_its_backend_config(overrides: tuple[str, ...], sizes: tuple) -> None:
    cfg = compose_run_config("backend=megatron", *overrides)
    validate_run_settings(cfg)
    spec = backend_spec(cfg)
    assert (spec.tp, spec.pp, spec.sp, spec.micro_batch_size) == sizes
    assert not {"tp", "pp", "sp", "micro_batch_size"} & set(cfg.parallel)


@pytest.mark.parametrize(("layout", "ordered"), [("parallel=tp2", True), ("parallel=tp2_sp", True), ("parallel=pp2", False)])
def test_megatron_tensor_parallel_strategy_orders_kernel_launches(layout: str, ordered: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TP the strategy sets CUDA_DEVICE_MAX_CONNECTIONS=1 before any process starts (megatron overlaps the
    backward's gradient all-reduce with the weight-gradient product only then); a user's own value is kept."""
    from splitllama.run.trainer import make_strategy

    # set, then deleted: monkeypatch records the original state, so the value make_strategy sets is undone
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "unset")
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    cfg = compose_run_config("backend=megatron", layout)
    strategy = make_strategy(cfg)
    assert type(strategy).__name__ == "MegatronStrategy"
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == ("1" if ordered else None)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    make_strategy(cfg)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


HF_REFUSES = [("parallel=tp2", "backend.tp"), ("parallel=pp2", "backend.pp"), ("backend.tp=2", "backend.tp"),
              ("backend.sp=true", "backend.sp"), ("backend.micro_batch_size=2", "backend.micro_batch_size")]


@pytest.mark.parametrize(("override", "key"), HF_REFUSES, ids=[o for o, _ in HF_REFUSES])
def test_hf_backend_refuses_megatron_sizes_at_composition(override: str, key: str) -> None:
    with pytest.raises(RunConfigError, match=rf"^{key}=\S+: needs backend=megatron \(backend=hf"):
        validate_run_settings(compose_run_config(override))
