"""The steps of an experiment, one module each; ``run.py``'s tasks are tables of contents over them.

    schema      the config's typed schema (Hydra structured configs)
    settings    the config's own rules, and the names the steps read off it
    checks      the whole config against the donors, the saved model and the installed modules
    donors      where the donors are, their tokenizers, their scores (the references)
    data        the documents and the Lightning data module
    model       the adapter's start, the model spec, the LightningModule
    trainer     seeds, strategy, loggers, callbacks, the Trainer
    resume      which checkpoint, and whether it is the same run
    export      the split model saved whole or not at all
    downstream  the downstream tasks (``eval.harness``)
    setup       what a task works on: check, then load
    fit         train, score, export, downstream (``task=train``)
    rl          GRPO post-training (``task=grpo``)
    generate    completions from a saved model (``task=generate``)
    outcome     the run directory claimed and ``results.json`` written, however the task ends

The run floor: it imports the floors below (training, the model, the ground), never the entry points.
Nothing is imported here, so ``run.py`` pays only for the steps a task takes.
"""
