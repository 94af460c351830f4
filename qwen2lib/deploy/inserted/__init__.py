"""The code the patches insert into ``modeling_qwen2.py``, as real modules: each one is copied into every deploy
package as ``<module>_<target>.py`` (``deploy/package.py``) and imported there by one line its patch adds, so the
patched file itself holds only short call sites. They import only torch and transformers: a package runs where
qwen2lib is not installed. Dual Chunk Attention's module is ``scratch/dual_chunk.py``, the fast path of the
teaching ``scratch/dca.py`` as well (the package order lets deploy read scratch, not the other way round).

  causal_mask.py   patch 3 (eager_attention): the causal / sliding-window / padding mask from arange and comparisons
  kv_cache.py      patch 4 (explicit_kv_cache): the outputs with ``presents``, the cache conventions, the past length
"""
