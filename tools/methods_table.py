"""Write docs/methods.md's method-by-property table from the method registry.

python tools/methods_table.py            # rewrite the table in place
python tools/methods_table.py --check    # exit 1 if the page is not current
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pst_ds.methods import table  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the page is current")
    args = parser.parse_args()
    page = PAGE.read_text()
    current = table.with_table(page)
    if args.check:
        print("current" if current == page else f"{PAGE} is stale: run python tools/methods_table.py")
        return 0 if current == page else 1
    PAGE.write_text(current)
    print(f"wrote the method table into {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
