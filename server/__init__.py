"""The Flower ServerApp of the platform and the ``fedsto`` command line."""
