"""Trainer integrations. Each submodule imports its framework, so import the one you use:

- :mod:`p2t.integrations.trl`: ``P2TGRPOTrainer``, TRL's ``GRPOTrainer`` with P2T token advantages, and
  ``P2TGRPOConfig``, TRL's ``GRPOConfig`` with the P2T options as ``p2t_*`` fields.
- :mod:`p2t.integrations.verl`: the ``"p2t"`` advantage estimator and reward manager for verl
  (registered when verl starts, through the package's ``verl.plugins`` entry point).
- :mod:`p2t.integrations.scorers`: ``CallableScorer`` and ``http_scorer``, a PRM behind a function or a
  service in place of a ``P2TScorer`` (plain torch; used by both trainers).

Nothing is imported here, so ``import p2t.integrations`` needs neither TRL nor verl.
"""
