"""The README states what the library computes."""

from pathlib import Path

from tpa.models.t6.accounting import kv_cache_table_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_kv_table_is_what_the_library_computes():
    text = README.read_text()
    table = text.split("<!-- kv-table:start -->")[1].split("<!-- kv-table:end -->")[0].strip()
    assert table == kv_cache_table_markdown()
