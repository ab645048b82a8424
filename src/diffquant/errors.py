"""User-facing exception types.

Every failure a user can fix raises a subclass of :class:`DiffquantError` whose message is one
sentence saying what was wrong and what to do. The CLI prints that sentence without a traceback
and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class DiffquantError(Exception):
    """Base class of every error a user can act on."""


class SpecError(DiffquantError):
    """The compression spec (file, keys or values) is invalid."""


class ModelLoadError(DiffquantError):
    """A model source does not exist, is not a diffusers model, or has unsafe weights."""


class TrackingError(DiffquantError):
    """The MLflow or Prefect home cannot be used (not writable, unreachable)."""


class DataError(DiffquantError):
    """Input data (trajectories, calibration sets) is unusable, e.g. contains NaN."""


class IntegrityError(DiffquantError):
    """A file does not match its recorded sha256 (tampered or incomplete); it is refused."""


class DeviceClassError(DiffquantError):
    """A version or bundle was built for another device class than the machine it is deployed to."""


class ExportError(DiffquantError):
    """A model cannot be exported (unsupported layer, uncalibrated quantizer, plan mismatch)."""


class RulesError(ExportError):
    """An exported ONNX model breaks TensorRT's explicit-quantization rules or disagrees with its plan."""


class ParityError(ExportError):
    """The exported model's outputs or samples differ from the PyTorch model's beyond the stated tolerance."""


class ConfigError(SpecError):
    """A config object passed to a core function has a value that function cannot use.

    ``key`` names the field relative to the config the caller passed (``keep_full_precision``, not
    ``quantize.keep_full_precision``), so a library user reads the name they wrote; the pipeline,
    which reads whole specs, prefixes the section with :meth:`in_section`.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def in_section(self, section: str) -> SpecError:
        """The same error naming the spec key ``<section>.<key>``."""
        return SpecError(f"{section}.{self.key}: {self.message}")


@contextmanager
def spec_section(section: str) -> Iterator[None]:
    """Re-raise a :class:`ConfigError` from the enclosed core call as a :class:`SpecError` naming ``<section>.<key>``."""
    try:
        yield
    except ConfigError as error:
        raise error.in_section(section) from None


class DiskFullError(DiffquantError):
    """A folder's disk (or quota) filled up while diffquant wrote to it; nothing partial is left."""
