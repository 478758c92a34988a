"""What a task works on, prepared in two steps: :func:`check` (no weights read) then :func:`load` (donors, data, references).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from ..configuration_split_llama import SplitLlamaConfig
from ..errors import RunConfigError
from .checks import validate
from .data import make_datamodule
from .donors import Donors, check_donor_files, check_donor_tokenizers, donor_references, load_tokenizer, resolve_donors, saved_model_donors, with_built_donors
from .downstream import prepare_harness
from .model import adapter_init, model_spec
from .settings import plain, uses_embedded_donors

if TYPE_CHECKING:
    from ..references import DonorReferences
    from .references import TunedReferences


@dataclass
class RunSetup:
    """What a task works on, prepared once: the validated split config, harness tasks, donors, tokenizer, data."""

    split: SplitLlamaConfig
    harness: Any = None
    donors: Donors | None = None
    model_dir: str | None = None
    tokenizer: Any = None
    data: Any = None
    references: DonorReferences | None = None
    #: the donors trained alike (:mod:`splitllama.run.references`), for a run that trains
    tuned: TunedReferences | None = None
    calibration: Any = None

    def spec(self, cfg: DictConfig) -> Any:
        """The model spec of this run (:func:`model_spec`), carrying the validated split config."""
        return model_spec(cfg, self.donors, calibration=self.calibration, model_dir=self.model_dir, split=self.split)


def check(cfg: DictConfig, record: Any, *, harness: bool = True) -> RunSetup:
    """Everything that needs no donor weights, before anything heavy: :func:`validate` (recorded as
    ``split``) and ``eval.harness``'s tasks (:func:`prepare_harness`)."""
    from ..results import split_summary

    split = validate(cfg)
    record.update("split", split_summary(split))
    return RunSetup(split, harness=prepare_harness(cfg) if harness else None)


def check_accelerator_present(cfg: DictConfig) -> None:
    """``parallel.accelerator=gpu`` (or ``cuda``) on a machine where torch sees no CUDA device: refused before the
    donors and the data load, instead of Lightning's error after them. (Not in ``validate``: a GPU config is
    composed and validated on CPU machines too, e.g. by the tests and before a job is submitted.)"""
    import torch

    accelerator = str(cfg.parallel.accelerator).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RunConfigError(
            f"parallel.accelerator={accelerator}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
            "torch.cuda.is_available() is False). Use parallel.accelerator=auto (this machine's CPU) or "
            "parallel.accelerator=cpu, or run on a machine with a GPU and a CUDA build of torch")


def load(cfg: DictConfig, record: Any, setup: RunSetup, *, stage: str | None, references: bool = True,
         model_dir: str | None = None) -> RunSetup:
    """Donors (built or cached; none for a saved ``model_dir``), tokenizer, data for ``stage``
    (``None``: only when ``adapter.init=lstsq`` needs calibration) and the donors' reference scores."""
    setup.model_dir = model_dir
    check_accelerator_present(cfg)
    if model_dir is None:
        with record.timed("donors"):
            setup.donors = resolve_donors(cfg)
        check_donor_files(cfg, setup.donors)  # both donors, before either is read
        check_adapter_checkpoint(cfg)
        if uses_embedded_donors(cfg):  # validated from their recipe, before they were built
            setup.split = with_built_donors(setup.split, setup.donors)
    elif references and cfg.eval.references and saved_model_donors(setup.split) is not None:
        # the donors a saved model is compared with, before its data is tokenised and either donor scored
        check_donor_files(cfg, saved_model_donors(setup.split), given_by=f"task.model_dir={cfg.task.model_dir}")
    setup.tokenizer = load_tokenizer(model_dir or setup.donors.path8b,
                                     f"task.model_dir={cfg.task.model_dir}" if model_dir else
                                     None if uses_embedded_donors(cfg) else f"donors.path8b={cfg.donors.path8b}")
    if model_dir is None:
        check_donor_tokenizers(cfg, setup.donors, setup.tokenizer, record)
    if stage is not None or (model_dir is None and adapter_init(cfg) == "lstsq"):  # a saved model is not initialised
        with record.timed("data"):
            setup.data = make_datamodule(cfg, setup.tokenizer)
            try:
                setup.data.setup(stage or "fit")
            except ValueError as exc:  # too few documents or tokens for the split and the blocks: name the corpus
                origin = f"data.files={list(cfg.data.files)}" if plain(cfg.data.source) == "files" else f"data.source={plain(cfg.data.source)}"
                raise RunConfigError(f"{exc} ({origin})") from None
        setup.calibration = setup.data.train_blocks[: cfg.adapter.calibration_blocks]
    if references:
        # a saved split model is compared with the donors it was assembled from, where they still are
        reference_donors = setup.donors or saved_model_donors(setup.split)
        if reference_donors is not None:
            with record.timed("references"):  # before the split model is built: one donor in memory at a time
                setup.references = donor_references(cfg, reference_donors, setup.data.val_blocks)
            if setup.references is not None:
                record.update("references", setup.references.as_record())
    return setup


def check_adapter_checkpoint(cfg: DictConfig) -> None:
    """``adapter.checkpoint`` whole before the run tokenises, scores or assembles anything: a ``.safetensors`` file's
    header against its size, a torch file's zip archive against each member's CRC-32 (what a resume checks,
    :func:`~splitllama.training.callbacks.checkpoint_archive_problem`)."""
    import os
    from pathlib import Path

    if cfg.adapter.checkpoint is None:
        return
    from ..checkpoint import CheckpointError, LazyCheckpoint

    path = Path(os.path.expanduser(cfg.adapter.checkpoint))
    setting = f"adapter.checkpoint={cfg.adapter.checkpoint}"
    fix = "give the adapter weights a run saved again, or adapter.checkpoint=null to start the adapter afresh"
    if not path.is_file():
        raise RunConfigError(f"{setting}: {path} {'is a directory' if path.is_dir() else 'does not exist'}, not a .safetensors or "
                             f".pt file of adapter weights; {fix}")
    if path.suffix == ".safetensors":
        try:
            LazyCheckpoint(path, role=setting)
        except CheckpointError as exc:
            raise CheckpointError(f"{setting}: {exc}; {fix}") from None
        return
    from ..training.callbacks import checkpoint_archive_problem

    problem = checkpoint_archive_problem(path)
    if problem:
        raise CheckpointError(f"{setting}: {path} is {problem}; {fix}")


__all__ = ["RunSetup", "check", "check_adapter_checkpoint", "load"]
