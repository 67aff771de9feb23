"""The package's version, defined once: the build reads it (hatch's dynamic version),
``treeguard.__version__`` and ``treeguard --version`` import it."""

__version__ = "0.1.0"
