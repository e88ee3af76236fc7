"""restorer: remove JPEG artifacts with convolutional networks."""

__version__ = "0.1.0"
