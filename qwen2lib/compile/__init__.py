"""Stage 4, compiled graphs (notebook 04): a YAML config (``config_schema.py``) becomes a plan (``plan.py``), a graph
built node by node (``ops.py``, ``builder.py``, ``dual_chunk.py``) or traced (``trace.py``), checked against its
torch model (``verify.py``; the reference and tokens from ``reference.py``) and installed by ``stage.py``;
``runtime.py`` runs any of them in onnxruntime with an explicit KV cache.

Deliberately empty: importing ``qwen2lib.compile.runtime`` (as generation does) loads no graph compiler."""
