"""SaladCloud integration: the public REST API (``api``), the in-container instance metadata
service (``imds``), the ``musetalk-job salad ...`` commands (``cli``) and the throughput/cost
model (``plan``).

Nothing here imports torch or other heavy libraries at import time; ``requests`` is imported
where a call is made.
"""
