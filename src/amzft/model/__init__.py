"""The LightningModule and what builds it: backends, model sources, loss, NEFTune, precision."""
