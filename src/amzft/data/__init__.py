"""The trn.json data pipeline, one way: read → clean → split (cached) → encode → batch."""
