"""Language-model experiments of Wei, Kakade & Ma (ICML 2020) on dropcheck.

- ``training.data``: word-level corpora (PTB, WikiText-2), batching, BPTT windows;
- ``training.model``: AWD-LSTM whose every dropout is a dropcheck site;
- ``training.rules``: the update rules (DROPOUT_k, noise injection, explicit,
  implicit, combined, ablations);
- ``training.configs``: named configs, overrides, validation;
- ``training.trainer``: the loop, logs, checkpoints, resume, data parallelism;
- ``training.cli``: ``dropcheck train``;
- ``training.bench``: ``dropcheck bench``, every update rule timed side by side;
- ``training.fd_check``: the finite-difference estimators against the exact
  ones in float32/TF32 (``training/gpu_check.sh`` runs both on a GPU).
"""
