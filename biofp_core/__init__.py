"""BioFP core: signals, window store, models, training, privacy and fingerprints (no Flower)."""

__version__ = "0.1.0"
