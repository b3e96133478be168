"""Class activation maps as pictures: the one overlay (heat map, true boxes green, predicted boxes yellow) and the
CAM files a backend's run writes, so the run, the report and the scoring service all show the same pixels."""
