"""mypyc's class marker, a no-op where the core runs as plain Python.

The policies are compiled with mypyc in release wheels. mypyc reads ``mypy_extensions.mypyc_attr`` as
the type checker sees it, and drops the decorator from compiled code. At run time the core imports
nothing outside the standard library, so plain Python gets this identity decorator instead. The
compiled modules import ``mypyc_attr`` from here; this module itself is never compiled (mypyc would
turn the branch the type checker does not take into a trap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*attrs, **kwattrs):
        """Return the class unchanged."""
        return lambda cls: cls
