"""The errors a user acts on (a file to fix, a path to correct), importable without torch."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, pickled, or not fitting the model."""


class DataLayoutError(FileNotFoundError):
    """A dataset root that is missing or not in the layout its reader expects."""
