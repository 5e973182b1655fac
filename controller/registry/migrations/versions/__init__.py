"""edgefleet."""
