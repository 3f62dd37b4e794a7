"""One exception for the package, one subclass per failure family.

Messages name the file, the tensor or field, the bad value and the limit, so a
command-line tool can print ``str(err)`` as its single line of output.
"""

from __future__ import annotations


class MoubFormatError(ValueError):
    """A .moub file (or an argument to the writer) is not valid."""


class TruncatedFileError(MoubFormatError):
    """The file is shorter than its own structure says."""


class VersionError(MoubFormatError):
    """Wrong identifier, a newer major version or unknown required features."""


class StructureError(MoubFormatError):
    """The FlatBuffer index is malformed: offsets, vtables, vectors, strings, nesting."""


class LayoutError(MoubFormatError):
    """Payload sections overlap, leave gaps, are misaligned or trail the file."""


class LimitError(MoubFormatError):
    """A declared size or count exceeds a reader cap (decompression bomb, absurd dims)."""


class EnumError(MoubFormatError):
    """An enum field holds a value this reader does not know."""


class CodebookError(MoubFormatError):
    """Codebook empty, too long, non-finite, or an index outside it."""


class HuffmanError(MoubFormatError):
    """Code-length table invalid (Kraft sum not 1, too long) or stream not decodable."""


class ChecksumError(MoubFormatError):
    """Stored bytes do not match their checksum."""


class GraphError(MoubFormatError):
    """The embedded ONNX graph does not match the tensors the file provides."""


class MetadataError(MoubFormatError):
    """Metadata keys or values too long, duplicated, or not UTF-8."""


def where(filename: str | None, subject: str) -> str:
    """Prefix for messages: 'model.moub: tensor init:w: '."""
    return f"{filename}: {subject}: " if filename else f"{subject}: "
