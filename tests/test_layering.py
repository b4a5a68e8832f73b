"""pst_ds's modules import downwards only: config -> methods -> layers -> controller -> export."""

import sys
import textwrap

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from import_cycles import cycles  # noqa: E402


def test_pst_ds_has_no_import_cycle():
    assert cycles(ROOT / "pst_ds") == []


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "d.py").write_text(
        textwrap.dedent("""
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from .e import x
        """)
    )
    (package / "e.py").write_text("from .d import y\n")  # d -> e only for the type checker
    assert cycles(package) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
