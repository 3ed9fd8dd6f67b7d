"""BioFP simulations package."""
