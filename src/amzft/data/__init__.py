"""The trn.json data pipeline: read → clean → filter → prompt → tokenise → cache → batches."""
