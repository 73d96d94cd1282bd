"""Keep an experiment's global batch on any number of processes.

A config's ``data.batch_size`` is the paper's batch (CIFAR 100, PTB 20 streams). One process
trains on it as it is. The multi-device trainer files (``configs/trainer/ddp.yaml``,
``slurm.yaml``) add :class:`GlobalBatch`, which reads that number as the *global* batch and
gives each of the ``W = devices x num_nodes`` processes ``batch_size / W``:

    per-process batch = global batch / W         (100 on 4 GPUs: 25 each)

so the optimization is the paper's whatever the cluster. When ``W`` does not divide the global
batch it refuses before the first step, naming the numbers, instead of training on another
batch (8 GPUs: 100 / 8 = 12.5).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

# evaluation batches that default to the training batch and are divided with it
_FOLLOWERS = ("val_batch_size",)


class GlobalBatch(Callback):
    """Divide the datamodule's ``batch_size`` (the global batch) over the processes at ``fit``
    (see the module docstring); ``val_batch_size`` too when it equals the training batch."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        world = int(trainer.world_size)
        if stage != "fit" or datamodule is None or world == 1:
            return
        if getattr(datamodule, "_global_batch", None) is not None:
            return  # divided already (a second fit of the same objects)
        global_batch = getattr(datamodule, "batch_size", None)
        if not isinstance(global_batch, int):
            raise TypeError(
                f"GlobalBatch needs a datamodule with an int batch_size, got "
                f"{type(datamodule).__name__}.batch_size = {global_batch!r}"
            )
        if global_batch % world:
            raise ValueError(
                f"the global batch data.batch_size={global_batch} does not divide over "
                f"{world} processes (devices {trainer.num_devices} x num_nodes "
                f"{trainer.num_nodes}): use a process count that divides {global_batch}, or "
                "drop GlobalBatch from the trainer's callbacks to give the batch per process"
            )
        per_process = global_batch // world
        for name in _FOLLOWERS:
            if getattr(datamodule, name, None) == global_batch:
                setattr(datamodule, name, per_process)
        datamodule.batch_size = per_process
        datamodule._global_batch = global_batch
        if trainer.is_global_zero:
            print(
                f"lit-divnorm: global batch {global_batch} = {world} processes x {per_process}",
                flush=True,
            )
