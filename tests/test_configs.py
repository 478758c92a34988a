"""Every option of every config group composes and instantiates in-process (no subprocess, no weights).

As lightning-hydra-template's ``tests/test_configs.py``: each ``conf/<group>/<option>.yaml`` is
composed over the defaults, its range checks run (:func:`validate_run_settings`), and what builds
itself from ``_target_`` is instantiated: the backend object, the objective, the optimizer settings and
the logger factory. Options that only make sense with others (a megatron
parallel layout, real-donor presets) get those others; a settings error is a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from splitllama.results import register_run_dir_resolver
from splitllama.training.backend_spec import BackendSpec, backend_spec
from splitllama.training.callbacks import make_loggers
from splitllama.training.module import OptimSettings
from splitllama.training.objectives import Objective
from splitllama.training.schema import RunConfigError, register_configs, validate_run_settings
from tests.conftest import REPO, compose_run_config

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


HF_REFUSES = [("parallel=tp2", "backend.tp"), ("parallel=pp2", "backend.pp"), ("backend.tp=2", "backend.tp"),
              ("backend.sp=true", "backend.sp"), ("backend.micro_batch_size=2", "backend.micro_batch_size")]


@pytest.mark.parametrize(("override", "key"), HF_REFUSES, ids=[o for o, _ in HF_REFUSES])
def test_hf_backend_refuses_megatron_sizes_at_composition(override: str, key: str) -> None:
    with pytest.raises(RunConfigError, match=rf"^{key}=\S+: needs backend=megatron \(backend=hf"):
        validate_run_settings(compose_run_config(override))
