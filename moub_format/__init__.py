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
from .writer import OWN, SMALLEST, GridCodebook, HuffmanTensor, PackSpec, RawTensor, build, write, write_atomic

__all__ = [
    "DEFAULT_LIMITS", "FORMAT_MAJOR", "FORMAT_MINOR", "ReaderLimits",
    "ChecksumError", "CodebookError", "EnumError", "GraphError", "HuffmanError", "LayoutError",
    "LimitError", "MetadataError", "MoubFormatError", "StructureError", "TruncatedFileError", "VersionError",
    "MoubFile", "open_moub", "HuffmanTensor", "RawTensor", "build", "write", "write_atomic",
    "GridCodebook", "PackSpec", "OWN", "SMALLEST", "PackInfo", "PackMember", "TensorInfo", "scale_member",
]
