"""stream-adapt: a Kafka consumer for recommenders that learns while it serves.

Feedback events are grouped per entity into few-shot windows; each full window adapts that entity's
small adapter on top of a frozen pretrained recommender (batched, gated), and accepted adapters are
published, versioned, for serving to read.
"""

__version__ = "0.1.0"
