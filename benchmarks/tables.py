"""Tables the benchmark scripts print and paste into benchmarks/README.md: GitHub markdown, without tabulate."""
from __future__ import annotations


def markdown(table) -> str:
    """A pandas DataFrame as a GitHub markdown table (index first), values as ``str`` gives them."""
    header = [str(table.index.name or "")] + [str(c) for c in table.columns]
    rows = [[str(i)] + ["" if v is None or v != v else str(v) for v in row]
            for i, row in zip(table.index, table.itertuples(index=False))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
