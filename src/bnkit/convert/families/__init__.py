"""The translations, one module per layer family, each holding both directions side by side.

Importing this package imports every module in it, which registers their converters (see
:mod:`bnkit.convert.registry`): a new family is a new module here, with nothing to list.
"""

import importlib
import pkgutil

FAMILIES = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))

for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")
