"""Loading donor or split-model weights into the megatron split model, and exporting it back to HF."""
