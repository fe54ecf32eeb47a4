"""The architectures the pipeline trains, one module each defining ``ARCH``
(registered by module name in ``training.pipeline.lm.ARCHS``)."""
