"""Trainer integrations. Each submodule imports its framework, so import the one you use:

- :mod:`p2t.integrations.trl`: ``P2TGRPOTrainer``, TRL's ``GRPOTrainer`` with P2T token advantages.
- :mod:`p2t.integrations.verl`: the ``"p2t"`` advantage estimator and reward manager for verl
  (registered when verl starts, through the package's ``verl.plugins`` entry point).

Nothing is imported here, so ``import p2t.integrations`` needs neither TRL nor verl.
"""
