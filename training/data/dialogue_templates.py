"""The dialogue templates: what a user asks and what the assistant answers, per request style.

Usage::

    from training.data.dialogue_templates import ASSISTANT_TEMPLATES, USER_TEMPLATES
    USER_TEMPLATES["question"][0].format(class_name="star", phrase="on the left")

One source for every consumer: the build's template dialogue backend (``pipeline.dialogue``) writes dialogues
from them, and the synthetic world trains its ``llm`` on the same text (``training.world.llm``), so the world
LLM speaks the language of the datasets the MLLM is trained on.
"""
from __future__ import annotations

#: style → user request templates (fields: ``class_name``, ``phrase``)
USER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "clear": (
        "Generate an image of this {class_name} {phrase}.",
        "Please create a picture of this {class_name} {phrase}.",
        "Show this {class_name} {phrase}, keeping its look the same.",
    ),
    "ambiguous": (
        "Something with this {class_name} {phrase} would be nice.",
        "Maybe this {class_name}, {phrase}? Whatever you think works.",
        "I have this {class_name} here... {phrase}, I guess.",
    ),
    "question": (
        "Can you generate an image for this {class_name} {phrase}?",
        "What would this {class_name} look like {phrase}?",
        "Could you show me this {class_name} {phrase}?",
    ),
}

#: assistant reply templates (same fields)
ASSISTANT_TEMPLATES: tuple[str, ...] = (
    "Here is the {class_name} {phrase}. I kept the identity and distinctive features of your "
    "{class_name} while applying the change.",
    "I generated an image of this {class_name} {phrase}, preserving its appearance from your photo.",
    "This image shows the same {class_name} {phrase}: its key features match the reference, and the "
    "rest follows your request.",
)
