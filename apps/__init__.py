"""Applications built on edgerun's public API (installed as `edgerun.apps`)."""
