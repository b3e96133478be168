"""Data layer: NIH ChestX-ray14 reader, phantom generator, splits, prepared cache, batch order."""
