"""A backend as one object: what is backend-specific about a run, chosen by ``conf/backend/<name>.yaml``.

Each ``conf/backend/*.yaml`` names its class in ``_target_``; :func:`backend_spec` instantiates it
from the composed config. The object owns everything that differs between backends, so nothing
outside a backend's own module tests its name:

- :meth:`BackendSpec.validate`: its settings against the run (``parallel``, ``finetune``, ``adapter``),
  when the config is validated, before donors are read or any process starts;
- :meth:`BackendSpec.check_split`: the split model's shapes against its layout (megatron: TP divides heads);
- :meth:`BackendSpec.strategy`: its Lightning strategy;
- :meth:`BackendSpec.build`: the split model for this rank (a :class:`~splitllama.backend.interface.SplitBackend`),
  which also exports it;
- :attr:`BackendSpec.builds_per_rank`, :attr:`BackendSpec.runs_own_schedule`, :attr:`BackendSpec.part_prefixes`.

This class is the transformers backend (``hf``); ``splitllama.megatron.backend.MegatronBackendSpec``
is megatron-core's. It imports neither torch nor the backend's model code: validation stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..weight_map import part_prefixes
from ..errors import check_setting

if TYPE_CHECKING:
    from ..configuration_split_llama import SplitLlamaConfig
    from .interface import SplitBackend, SplitModelSpec


class BackendSpec:
    """The transformers backend (:class:`~splitllama.backend.hf.HFBackend`); the base of the others.

    The constructor takes ``conf/backend/<name>.yaml``'s fields. ``tp``, ``pp``, ``sp`` and
    ``micro_batch_size`` are model parallelism, which this backend does not do (tp = pp = 1, no
    sequence parallelism, gradient accumulation through ``trainer.accumulate_grad_batches``); the
    megatron backend reads them.
    """

    #: the split model's parameter-name prefixes of each part ``finetune.trainable`` can name
    part_prefixes: dict[str, tuple[str, ...]] = part_prefixes()
    #: the model is built inside the Trainer's processes, one shard per rank (``configure_model``
    #: inside validate/fit), not before the Trainer starts
    builds_per_rank = False
    #: trains through its own forward-backward schedule (manual optimisation; it clips gradients
    #: itself, so the Trainer gets no ``gradient_clip_val``)
    runs_own_schedule = False
    #: ``parallel=fsdp`` (FSDP2 around this backend's model) is available
    shards_with_fsdp = True

    def __init__(self, name: str = "hf", dtype: str = "float32", attn_implementation: str = "sdpa",
                 gradient_checkpointing: bool = False, tp: int = 1, pp: int = 1, sp: bool = False,
                 micro_batch_size: int | None = None, options: dict[str, Any] | None = None) -> None:
        self.name = name
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.tp, self.pp, self.sp, self.micro_batch_size = tp, pp, sp, micro_batch_size
        self.options = dict(options or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype!r})"

    # ---------------------------------------------------------------- before anything heavy
    def validate(self, cfg: Any) -> None:
        """This backend's settings against the run config (it runs tp = pp = 1: a megatron ``parallel`` layout is refused)."""
        par = cfg.parallel
        # the megatron files of parallel (tp2, pp2, ...) set backend.tp / pp / sp: name the file the user chose
        chosen = f"; parallel={par.name} is a backend=megatron layout" if par.strategy == "megatron" else ""
        for key in ("tp", "pp"):
            value = getattr(self, key)
            check_setting(value == 1, f"backend.{key}", value, f"needs backend=megatron (backend={self.name} runs tp = pp = 1{chosen})")
        check_setting(not self.sp, "backend.sp", self.sp, f"needs backend=megatron (backend={self.name}{chosen})")
        check_setting(self.micro_batch_size is None, "backend.micro_batch_size", self.micro_batch_size,
               f"needs backend=megatron (backend={self.name} uses trainer.accumulate_grad_batches{chosen})")

    def check_split(self, split: SplitLlamaConfig, cfg: Any) -> None:
        """The validated split config against this backend's layout (nothing to check for ``hf``)."""

    # ---------------------------------------------------------------- the run
    def strategy(self, cfg: Any, timeout: dict[str, Any]) -> Any:
        """Lightning strategy for ``parallel``: auto (one device), ddp, or FSDP2 sharding (``fsdp``).

        ``parallel=fsdp`` gets :class:`~splitllama.backend.sharding.ShardedStrategy` (Lightning's
        ModelParallelStrategy; the module shards itself in ``configure_model``).
        """
        strategy = cfg.parallel.strategy
        if strategy == "fsdp":
            from .sharding import ShardedStrategy

            return ShardedStrategy(timeout_s=cfg.parallel.timeout_s)
        if strategy == "ddp":
            from lightning.pytorch.strategies import DDPStrategy

            return DDPStrategy(find_unused_parameters=False, **timeout)
        return strategy

    def build(self, spec: SplitModelSpec, options: dict[str, Any]) -> SplitBackend:
        """The split model for this process (assembled from donors, or a saved split model)."""
        from .hf import HFBackend

        return HFBackend(spec, options)


def backend_spec(cfg: Any) -> BackendSpec:
    """The backend object of a composed run config (``cfg.backend``'s ``_target_``)."""
    from hydra.utils import instantiate

    return instantiate(cfg.backend, _convert_="all")


__all__ = ["BackendSpec", "backend_spec"]
