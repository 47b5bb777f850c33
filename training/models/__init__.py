"""Model kit (:mod:`training.models.kit`), tiny checkpoints (:mod:`training.models.tiny`) and model definitions."""
