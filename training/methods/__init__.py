"""Per-method modules (one module per method: profusion, ico, dci, infusion, em_masks, ...)."""
