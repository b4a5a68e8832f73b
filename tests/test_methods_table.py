"""docs/methods.md's method-by-property table is the registry's (tools/methods_table.py)."""

from conftest import ROOT

from pst_ds.methods import METHODS, table


def test_the_method_table_in_the_docs_is_the_registrys():
    page = (ROOT / "docs" / "methods.md").read_text()
    assert table.with_table(page) == page, "docs/methods.md is stale: run python tools/methods_table.py"
    rows = [
        line for line in page.split(table.BEGIN)[1].split(table.END)[0].splitlines() if line.startswith("| `")
    ]
    assert [row.split("`")[1] for row in rows] == list(METHODS)
    pst = next(row for row in rows if row.startswith("| `pst` |")).split("|")[2:-1]
    assert [cell.strip() == "yes" for cell in pst] == [getattr(METHODS["pst"], p) for p in table.PROPERTIES]
