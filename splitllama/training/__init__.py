"""Training split models with Lightning: data, objectives, the LightningModule, backends, callbacks.

``run.py`` composes these from the Hydra config; each piece is usable alone.
"""
