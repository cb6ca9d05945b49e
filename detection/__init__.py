"""Detector engine of the platform: model, data, weather, losses, pseudo labels, metrics.

Knows nothing about Flower. Importing it configures Ultralytics for offline, quiet use.
"""

from detection import ultralytics_env as _ultralytics_env  # noqa: F401  (must run before ultralytics is imported)
