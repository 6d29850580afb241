"""goldstream: real-time quality control for data-labeling pipelines."""

__version__ = "0.1.0"
