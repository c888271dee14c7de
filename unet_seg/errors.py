"""The errors a user acts on (a file to fix, a path to correct), importable without torch."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, pickled, or not fitting the model."""


class DataLayoutError(FileNotFoundError):
    """A dataset root that is missing or not in the layout its reader expects."""


class InputError(ValueError):
    """An input the user gave that cannot be used: an image that cannot be read, a mask that is not a mask."""


class SanityCheckFailed(RuntimeError):
    """The check before a real run (`unet_seg.train.sanity_check`) failed: its message says in
    which part (a training step, the checkpoint, evaluating which set), on which rank, and why."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after writing a checkpoint (`unet_seg.train.training_batches`)."""

    def __init__(self, step: int, checkpoint: object = None, signal_name: str = "interrupt"):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f"wrote {checkpoint}; " if checkpoint is not None else "no checkpoint at this step; "
        super().__init__(f"{signal_name}: interrupted at step {step}; {where}rerun with --resume to continue")
