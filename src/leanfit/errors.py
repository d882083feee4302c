"""Errors a user can cause. Each message is one sentence: what was wrong and what to do.

The CLI prints the message of any `LeanfitError` and exits non-zero, without a traceback.
"""


class LeanfitError(Exception):
    """Base of every error a user can cause."""


class ConfigError(LeanfitError, ValueError):
    """A configuration value or argument is invalid."""


def check_known(given, valid, what: str) -> None:
    """Refuse keys outside `valid`, naming them and every valid one (config files, option dicts)."""
    valid = set(valid)
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ConfigError(f"Unknown {what} {', '.join(unknown)}; valid options are {', '.join(sorted(valid))}.")


class UnknownMethodError(ConfigError, KeyError):
    """A method name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class TargetError(ConfigError):
    """Target patterns matched no module, or a module of an unsupported kind."""


class AdapterError(LeanfitError, KeyError):
    """An adapter name is unknown, duplicated or in the wrong state (merged, inactive)."""

    def __str__(self) -> str:
        return self.args[0]


class UnknownAdapterError(AdapterError):
    """A request or a batch names an adapter that does not exist (the server answers 404)."""


class ArtifactError(LeanfitError):
    """An adapter file is missing, truncated, corrupt or of an unknown schema."""


class BaseModelMismatchError(ArtifactError):
    """An adapter was trained on another base model (fingerprints differ)."""


class DataError(LeanfitError, ValueError):
    """Training data is missing, empty or inconsistent (columns, labels)."""


class TrainingError(LeanfitError, RuntimeError):
    """Training cannot go on (e.g. a NaN/inf loss); the last good checkpoint is kept."""
