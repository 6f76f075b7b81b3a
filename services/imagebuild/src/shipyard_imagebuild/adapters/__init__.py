"""The image build's engine, independent of event sourcing.

- :mod:`.folder`: the model folder contract (``inspect_folder``), its source digest, and
  deterministic / safe tar.gz archives of it.
- :mod:`.envpack`: environment packs (``build_pack``, ``unpack``, ``cache_key``).
"""
