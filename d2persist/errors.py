"""Errors that d2persist turns into one clear sentence for the user."""

__all__ = [
    "DatasetMismatchError",
    "D2PersistError",
    "ArtifactError",
    "UnsafeArtifactError",
    "InputImageError",
    "OutputPathError",
    "ConfigError",
    "ConfigRoundTripError",
    "OutputDirNotEmptyError",
    "RunFolderBusyError",
    "CheckpointWriteError",
    "ExportError",
    "TrainingDivergedError",
    "EarlyStopped",
]


class D2PersistError(Exception):
    """Base class: an error whose message is a complete sentence meant for the user.

    Command-line tools print ``str(error)`` on one line and exit with code 2.
    """


class ArtifactError(D2PersistError):
    """An artifacts folder, bundle or checkpoint is missing, incomplete or inconsistent."""


class UnsafeArtifactError(ArtifactError):
    """A file would execute code if loaded (a pickle payload, a python YAML tag, ...)."""


class InputImageError(D2PersistError):
    """An input image is missing, empty, not an image or truncated."""


class OutputPathError(D2PersistError):
    """An output cannot be written where asked: a folder or a file in its way, or an input."""


class ConfigError(D2PersistError):
    """A config asks for something d2persist cannot do as asked."""


class ConfigRoundTripError(ConfigError):
    """The config would not load back from the YAML written for it."""


class OutputDirNotEmptyError(D2PersistError):
    """A new run would overwrite the checkpoints of an earlier run."""


class RunFolderBusyError(D2PersistError):
    """Another process is training into the same output folder (it holds the run lock)."""


class CheckpointWriteError(D2PersistError):
    """A checkpoint could not be written (disk full, permission denied, ...)."""


class ExportError(D2PersistError):
    """A model could not be exported to a format (ONNX): the reason in one sentence."""


class DatasetMismatchError(D2PersistError):
    """The dataset's categories are not the bundle's classes."""


class TrainingDivergedError(D2PersistError, FloatingPointError):
    """Training produced NaN or Inf: where, the checkpoint of the last good weights, what helps.

    A ``FloatingPointError`` too, so code that catches detectron2's still catches it.
    """


class EarlyStopped(SystemExit):
    """
    Not an error: training stopped early (``PERSIST.EARLY_STOP_PATIENCE``) and completed, with
    its final checkpoint and export. PersistHook raises it from the iteration it stopped after;
    :class:`~d2persist.PersistTrainer` and :func:`~d2persist.train_lazy` return normally instead.
    A stock ``DefaultTrainer`` lets it through its ``train()``: a ``SystemExit`` with code 0 (a
    script ends with exit status 0, as after its last line; catch it to go on after training).

    Attributes:
        iteration (int): the last iteration trained.
    """

    def __init__(self, iteration: int) -> None:
        super().__init__(0)
        self.iteration = iteration
