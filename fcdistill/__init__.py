"""fcdistill."""
