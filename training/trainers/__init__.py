"""Recipe-shaped trainers (one module per model) and the DeepSpeed loop they share (:mod:`.engine`)."""
