"""BioFP strategies package."""
