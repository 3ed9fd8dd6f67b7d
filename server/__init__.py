"""BioFP server package."""
