"""The artifact format: the contract ``etspec.export`` writes and ``etspec.runtime`` reads.

File names, the manifest schema with its format version, and the file records that let a reader check
the files before loading them. Imports nothing else of etspec, so both sides can depend on it.
"""

from .files import CUDA_DATA_NAME, MANIFEST_NAME, PTE_NAME, file_record, sha256_file
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_DTYPES,
    MANIFEST_METHOD,
    REQUIRED_METHODS,
    SAMPLED_METHODS,
    Dim,
    Manifest,
    ManifestError,
    MethodSig,
    TensorSig,
    UnsupportedFormatError,
    check_format_version,
    dtype_name,
    read_manifest,
    read_manifest_from_pte,
)

__all__ = [
    "CUDA_DATA_NAME",
    "FORMAT_VERSION",
    "MANIFEST_DTYPES",
    "MANIFEST_METHOD",
    "MANIFEST_NAME",
    "PTE_NAME",
    "REQUIRED_METHODS",
    "SAMPLED_METHODS",
    "Dim",
    "Manifest",
    "ManifestError",
    "MethodSig",
    "TensorSig",
    "UnsupportedFormatError",
    "check_format_version",
    "dtype_name",
    "file_record",
    "read_manifest",
    "read_manifest_from_pte",
    "sha256_file",
]
