"""The stage graph: each stage's folder is built whole or reused by one rule (``reuse.py``), keyed on its inputs,
its settings and the import closure of the code that builds it (``closure.py``)."""
