"""The world's state: slices, the canonical CBOR codec, the SQLite store and the saver."""
