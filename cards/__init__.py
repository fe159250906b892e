"""Model-card templates, packaged as data."""
