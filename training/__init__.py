"""Language-model experiments of Wei, Kakade & Ma (ICML 2020) on dropcheck.

The package has four rooms and one door:

- ``training/pipeline/``: what every run goes through.  ``configs`` (named
  configs, overrides, validation), ``data`` (word-level corpora, batching,
  BPTT windows), ``lm`` (the language-model contract and the registry of
  architectures, ``ARCHS``), ``rules`` (the paper's update rules and their
  registry, ``REGISTRY``), ``trainer`` (the loop, evaluation, data
  parallelism), ``state`` (what a checkpoint carries, the run log), ``files``
  (atomic writes, checkpoints, locks), ``factories`` (trained models for
  ``dropcheck verify/taylor-map --model``).  A new rule goes in ``rules``.
- ``training/models/``: the architectures, one module each defining ``ARCH``:
  ``awd_lstm`` (the paper's AWD-LSTM, every dropout a dropcheck site) and
  ``gpt2``.  A new model is one module here and one line in ``lm.ARCHS``.
- ``training/studies/``: what is run with the pipeline.  ``study`` (the plans
  behind the claims) and ``arm`` (the ``Arm`` of plans and bench),
  ``reproduce`` (``dropcheck reproduce``), ``bench`` (``dropcheck bench``),
  ``bound_runs`` (``dropcheck bound``), and one-off analyses: ``noise_scale``,
  ``locked_vs_positions``, ``fd_check``.  A new experiment goes here.
- ``training/scripts/``: shell scripts for a lent GPU machine
  (``gpu_check.sh``, ``gpu_study.sh``).
- ``training/cli.py``: ``dropcheck train``.

Layers: ``models`` and ``pipeline`` import nothing of ``studies``; the
pipeline finds the models through ``lm.ARCHS`` (module names).
"""
