"""The library version: a leaf module, so writers of checkpoints and weight files can import it without
importing the package."""
__version__ = "0.1.0"
