"""Training: the model, optimizers and schedules, batched augmentation on the device, the loop with its
checkpoints and resume, device choice, distributed data-parallel, scoring, and the LR range test.
"""
