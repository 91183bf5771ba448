"""Mixed precision: per-layer sensitivities (`sensitivity`), their exact
allocation under a cost budget (`allocate`), and the command that writes
the resulting rules (``python -m aqt_ext.mixed_precision``)."""
