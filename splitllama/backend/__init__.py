"""Backends: what is backend-specific about a run, and the transformers implementation.

    interface  what to build (SplitModelSpec) and what a built model offers (SplitBackend)
    spec       the backend object a conf/backend/*.yaml names in ``_target_`` (BackendSpec: the hf one)
    hf         the transformers backend (HFBackend)
    sharding   FSDP2 around the HF model (parallel=fsdp)

megatron-core's backend lives in :mod:`splitllama.megatron` (its ``MegatronBackendSpec``).
Nothing is imported here: validation reads :mod:`.spec` without torch.
"""
