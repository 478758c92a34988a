"""Every option of every config group composes and instantiates in-process (no subprocess, no weights).

As lightning-hydra-template's ``tests/test_configs.py``: each ``conf/<group>/<option>.yaml`` is
composed over the defaults, its range checks run (:func:`validate_run_settings`), and its backend
object is instantiated from ``_target_``. Options that only make sense with others (a megatron
parallel layout, real-donor presets) get those others; a settings error is a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from splitllama.training.backend_spec import BackendSpec, backend_spec
from splitllama.training.schema import validate_run_settings
from tests.conftest import REPO, compose_run_config

GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "hydra")
#: what an option needs beside itself to be valid
NEEDS = {
    "parallel": {name: ("backend=megatron",) for name in ("tp2", "tp2_sp", "tp2_dp2", "pp2", "tp2_pp2")},
    "experiment": {"megatron_multinode": ("backend=megatron",)},
}
#: presets of real donors: their paths are required (``???``); given as empty directories here
REAL_DONORS = ("llama3_8b_70b", "llama31_8b_70b", "llama32_1b_3b", "smollm2_135m_360m")


def _options() -> list[tuple[str, str]]:
    return [(group, p.stem) for group in GROUPS for p in sorted((REPO / "conf" / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda v: v)
def test_config_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}", *NEEDS.get(group, {}).get(option, ())]
    if group == "donors" and option in REAL_DONORS:
        for key in ("path8b", "path70b"):
            (tmp_path / key).mkdir()
            overrides.append(f"donors.{key}={tmp_path / key}")
    if group == "task" and option in ("eval", "generate"):
        overrides.append(f"task.model_dir={tmp_path}")
    if group == "data" and option == "files":
        overrides.append(f"data.files=[{tmp_path / 'a.txt'}]")
    cfg = compose_run_config(*overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate_run_settings(cfg)
    backend = backend_spec(cfg)
    assert isinstance(backend, BackendSpec) and backend.name == cfg.backend.name


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_backend_object_owns_its_settings(backend: str) -> None:
    """What differs between backends comes from the object ``conf/backend/<name>.yaml`` builds."""
    spec = backend_spec(compose_run_config(f"backend={backend}"))
    megatron = backend == "megatron"
    assert (spec.builds_per_rank, spec.runs_own_schedule, spec.shards_with_fsdp) == (megatron, megatron, not megatron)
    assert set(spec.part_prefixes) == {"adapter", "first", "last", "embeddings", "norm", "head", "all"}
    assert spec.part_prefixes["adapter"] == (("module." if megatron else "") + "model.adapter.",)
