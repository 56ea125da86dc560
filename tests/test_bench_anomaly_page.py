"""``benchmarks/anomaly.py`` writes docs/nonfinite.md again: its table is new, the page's
hand-written part below it is kept word for word."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_page_written_again_keeps_its_hand_written_part(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import anomaly
    finally:
        sys.path.remove(str(BENCH))
    result = json.loads((BENCH / "results.json").read_text(encoding="utf-8"))["anomaly"]
    prose = f"{anomaly.MARK}, and what it costs\n\n- written by hand, kept.\n"
    doc = tmp_path / "nonfinite.md"
    doc.write_text("# an old table\n\n| a |\n| --- |\n| 1 |\n\n" + prose, encoding="utf-8")
    page = anomaly.nonfinite_page(result, anomaly.kept_prose(str(doc)))
    assert page.endswith(prose) and page.count(anomaly.MARK) == 1
    assert "an old table" not in page and f"; {result['rounds']} rounds, " in page
    assert anomaly.kept_prose(str(tmp_path / "none.md")) == ""
    # the repository's page is what the script makes of its own stored result
    repo_doc = BENCH.parent / "docs" / "nonfinite.md"
    assert anomaly.nonfinite_page(result, anomaly.kept_prose(str(repo_doc))) == \
        repo_doc.read_text(encoding="utf-8")
