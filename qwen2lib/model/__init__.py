"""Stage 0, the checkpoint (notebook 00): which model a name means, its config, its tokenizer, its weights (a folder,
the cache, random at the real shapes, or the embedded ``tiny``), and what it needs in memory."""
