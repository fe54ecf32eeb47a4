"""Study plans, the study driver, the bench and one-off analyses, built on the
pipeline (``training/__init__.py`` has the map)."""
