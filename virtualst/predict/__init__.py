"""Virtual ST for a slide without sequencing: spot grid, predictions, maps, signatures, hotspots, report."""
