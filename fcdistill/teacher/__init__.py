"""Teacher labeling and synthetic data with verification."""
