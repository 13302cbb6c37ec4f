"""User-facing errors: each message is one sentence naming the key or file, the value, and what is allowed."""


class ReftLabError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


class ConfigError(ReftLabError, ValueError):
    """A config key holds a value that is not allowed."""


class ModelLoadError(ReftLabError):
    """A model could not be located or loaded."""


class AdapterError(ReftLabError):
    """An adapter directory is missing, corrupt, or was trained on another base model."""


def config_error(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")
