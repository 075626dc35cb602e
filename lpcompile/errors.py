"""Named errors. Each is a one-line, user-facing reason; the CLI prints `lpcompile: error: <msg>`."""


class LpcompileError(Exception):
    """Base of every error lpcompile raises on purpose (bad input, unsupported request)."""


class FormatError(LpcompileError, ValueError):
    """An invalid numeric format or QuantSpec, or one that does not parse."""


class ModelError(LpcompileError):
    """The model cannot be read, is malformed, or uses something lpcompile does not support."""


class CalibrationError(LpcompileError):
    """Calibration data is missing, malformed, does not match the model inputs, or holds NaN/inf."""


class PassError(LpcompileError):
    """A pass could not run; the message names the passes that already ran."""


class TargetError(LpcompileError):
    """The target cannot run the requested format, or is unknown."""


class BackendError(LpcompileError, RuntimeError):
    """A backend's toolchain failed or behaved otherwise than the backend relies on (a TVM
    internal that changed: lpcompile is tested with the apache-tvm releases pyproject.toml
    allows; nvcc rejecting the generated code)."""
