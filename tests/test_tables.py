"""velodiff.eval.tables: the one markdown table helper (every report's tables go through it)."""

from velodiff.eval.tables import markdown_table


def test_markdown_table_layout_alignment_and_short_rows():
    text = markdown_table(["NFE", "solver", "error"], [[5, "ddim", "0.1"], [10, "failed: boom"]], align="rl")
    assert text == (
        "| NFE | solver | error |\n"
        "|---:|---|---|\n"
        "| 5 | ddim | 0.1 |\n"
        "| 10 | failed: boom |"
    )
    assert markdown_table(["a"], []) == "| a |\n|---|"
