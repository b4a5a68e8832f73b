"""docs/architecture.md names every module of pst_ds and every program in launch/, tools/ and
examples/: a file it does not mention fails here, so the map cannot go stale unnoticed."""

from conftest import ROOT


def test_every_module_and_program_is_in_the_architecture_doc():
    doc = (ROOT / "docs/architecture.md").read_text()
    files = [p for p in (ROOT / "pst_ds").rglob("*.py") if p.name != "__init__.py"]
    for folder in ("launch", "tools", "examples"):
        files += [p for p in (ROOT / folder).iterdir() if p.is_file()]
    named = [p for p in files if f"`{p.name}`" in doc or f"/{p.name}`" in doc]  # `x.py` or `dir/x.py`
    missing = sorted(str(p.relative_to(ROOT)) for p in files if p not in named)
    assert not missing, f"docs/architecture.md does not mention: {', '.join(missing)}"
