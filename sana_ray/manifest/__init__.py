"""The training manifest: load, validate, override, print.

Everything here is light (pydantic + PyYAML only) so that ``sana-ray validate`` is instant.
"""

from .errors import ManifestError, Problem
from .loader import dump_manifest, flatten_manifest, load_document, load_manifest, manifest_fingerprint, manifest_json_schema
from .overrides import parse_overrides
from .schema import Manifest
from .sweep import Sweep

__all__ = [
    "Manifest",
    "ManifestError",
    "Problem",
    "Sweep",
    "dump_manifest",
    "flatten_manifest",
    "load_document",
    "load_manifest",
    "manifest_fingerprint",
    "manifest_json_schema",
    "parse_overrides",
]
