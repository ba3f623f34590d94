"""Safe YAML loader/dumper that read ``1e-4`` as a float (as YAML 1.2 does; PyYAML's 1.1 rules
read it as a string). Both are subclasses of the Safe classes: no arbitrary objects, ever."""

from __future__ import annotations

import re

import yaml

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader, plus: plain scalars like 1e-4 or 3E5 are floats."""


class SafeDumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes strings SafeLoader above would read as floats."""


for _cls in (SafeLoader, SafeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))
