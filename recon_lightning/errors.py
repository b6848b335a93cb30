"""Errors a user can fix. ``python -m recon_lightning.fit`` prints their message without a traceback."""


class ReconError(Exception):
    """Base class: something about the input or configuration is wrong."""


class ConfigError(ReconError):
    """A config value is unknown, out of range or inconsistent."""


class DataError(ReconError):
    """Input data is missing, empty or corrupt."""


class ModelMismatchError(ReconError):
    """A model or embedding does not match what the config or another stage expects."""


class DivergedError(ReconError):
    """An optimisation produced NaN or inf."""


class UnhealthyVictimError(ReconError):
    """The victim cannot be a reconstruction target (collapsed, or training samples misclassified)."""


class BusyError(ReconError):
    """Another job holds the run_dir."""
