"""Everything that is tensors: model kit, model definitions, attention processors, methods, samplers, trainers.

``training`` imports neither ``filtering`` nor ``pipeline`` and never imports Ray.
"""
