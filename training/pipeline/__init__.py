"""The training pipeline: configs, data, the language-model contract and its
registry of architectures, the update rules, the trainer, checkpoints and the
run log (``training/__init__.py`` has the map)."""
