"""The on-device part of edgemerge: numpy only at import; onnxruntime / torch / TensorRT lazily.

>>> from edgemerge.runtime import open_bundle     # doctest: +SKIP
"""

from .bits import pack_bits, unpack_bits
from .bundle import Bundle, open_bundle
from .kernel import apply_mask_reference

__all__ = ["Bundle", "apply_mask_reference", "open_bundle", "pack_bits", "unpack_bits"]
