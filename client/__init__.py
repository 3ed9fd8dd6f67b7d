"""BioFP client package."""
