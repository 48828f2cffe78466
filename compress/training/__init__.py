"""Training: the loop (augmentation, schedules, per-epoch evaluation, resume), DDP under torchrun, the default model."""
