"""The error a run ends with when it cannot continue: :class:`TrainingError`.

Its message is one line that says why and what was kept; the CLI prints it and exits 1. The
particular ones derive from it where they are raised: :class:`~preftune.storage.StorageError` (the
disk refused a write), :class:`~preftune.nonfinite.NonFiniteError`, :class:`~preftune.preemption.Preempted`.
"""


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what was kept."""
