"""The .moub container: canonical writer, hostile-input-safe reader, Huffman codec.

Depends on numpy, flatbuffers and bitarray only. See FORMAT.md for the spec.
"""

from .constants import DEFAULT_LIMITS, FORMAT_MAJOR, FORMAT_MINOR, ReaderLimits
from .errors import (
    ChecksumError,
    CodebookError,
    EnumError,
    GraphError,
    HuffmanError,
    LayoutError,
    LimitError,
    MetadataError,
    MoubFormatError,
    StructureError,
    TruncatedFileError,
    VersionError,
)
from .index import PackInfo, PackMember, TensorInfo
from .reader import MoubFile, open_moub, scale_member

# The writer loads on first use: a device that only reads .moub files does not pay
# for importing it (and its FlatBuffers builders) at every process start.
_WRITER_NAMES = frozenset({"OWN", "SMALLEST", "GridCodebook", "HuffmanTensor", "PackSpec", "RawTensor", "build", "write",
                           "write_atomic"})


def __getattr__(name: str):
    if name in _WRITER_NAMES:
        from . import writer

        return getattr(writer, name)
    if name == "__version__":
        from .version import distribution_version

        return distribution_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_LIMITS", "FORMAT_MAJOR", "FORMAT_MINOR", "ReaderLimits",
    "ChecksumError", "CodebookError", "EnumError", "GraphError", "HuffmanError", "LayoutError",
    "LimitError", "MetadataError", "MoubFormatError", "StructureError", "TruncatedFileError", "VersionError",
    "MoubFile", "open_moub", "HuffmanTensor", "RawTensor", "build", "write", "write_atomic",
    "GridCodebook", "PackSpec", "OWN", "SMALLEST", "PackInfo", "PackMember", "TensorInfo", "scale_member",
]
