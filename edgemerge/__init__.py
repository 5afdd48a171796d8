"""edgemerge: N fine-tuned checkpoints of one base model -> one file, switched on the device.

Core API (torch is never imported here):

    from edgemerge import merge, MergeConfig, open_bundle, write_bundle
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import BackendError, CheckpointError, ConfigError, EdgemergeError, FormatError, TaskError  # noqa: E402
from .runtime.bundle import Bundle, open_bundle  # noqa: E402


def __getattr__(name: str):  # keep `import edgemerge` light: the merge machinery loads on use
    if name in ("merge", "MergeConfig", "MergeReport"):
        from . import pipeline as _merge

        return getattr(_merge, name)
    if name == "write_bundle":
        from .bundle import write_bundle

        return write_bundle
    raise AttributeError(name)


__all__ = [
    "BackendError", "Bundle", "CheckpointError", "ConfigError", "EdgemergeError", "FormatError",
    "MergeConfig", "MergeReport", "TaskError", "__version__", "merge", "open_bundle", "write_bundle",
]
