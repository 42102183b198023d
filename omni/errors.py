"""Every error a user can cause, under one base class.

Each area raises its own subclass of OmniError with a message that names the file, line, field or key at fault
and says what to do. The CLI turns any OmniError into one line, `omni: error: <message>`, and exit code 2, in one
place (omni.cli.main); nothing else catches them to re-word them. Anything that is not an OmniError is a bug in
omni and keeps its traceback. The subclasses also derive from ValueError (RuntimeError for a workdir with no
readable checkpoint), so code that caught those before keeps working.
"""

from __future__ import annotations


class OmniError(Exception):
    """Bad input or a setting that cannot work: the message says where and what to do."""


class ConfigError(OmniError, ValueError):
    """A config key that does not exist, a value of the wrong type, or fields that do not fit together."""


class MeshError(OmniError, ValueError):
    """The configured mesh does not fit the devices."""


class DistributedError(OmniError, ValueError):
    """The multi-process settings in the environment are incomplete or malformed."""


class ManifestError(OmniError, ValueError):
    """A manifest line that cannot be used: `path:line: reason`."""

    def __init__(self, path, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


class DatasetError(OmniError, ValueError):
    """A dataset that cannot be built or opened as asked."""


class CatalogError(DatasetError):
    """A catalog dataset that cannot be opened: unknown name or option, not prepared, TensorFlow missing."""


class AudioError(OmniError, ValueError):
    """An audio file that cannot be used; the message names the file and what to do about it."""


class CodecError(OmniError, ValueError):
    """A codec that cannot be built, loaded or used as asked; the message says what to do instead."""


class TokenizerError(OmniError, ValueError):
    """A tokenizer that cannot be loaded, trained or saved; the message names the path and what to do."""


class CheckpointMismatchError(OmniError, ValueError):
    """The checkpoint was written by a model of another shape (a different config)."""


class NoUsableCheckpointError(OmniError, RuntimeError):
    """Checkpoints exist but none of them can be read."""


class ExportError(OmniError, ValueError):
    """An export that cannot be written or read as asked; the message says what to do instead."""


class InitFromError(OmniError, ValueError):
    """model.init_from names weights that cannot start this model; the message names the file or tensor."""


class GenerateError(OmniError, ValueError):
    """A prompt or setting that cannot be generated from; the message names the file or value at fault."""


class WorkdirError(OmniError, RuntimeError):
    """A workdir that is in use by another run, not writable, or full; the message names it and what to do."""


class StorageError(OmniError, OSError):
    """A location that cannot be used: a mistyped URL, a missing bucket or credentials, storage not answering."""
