"""The HTTP edge of tta-serve: ``create_app(settings)`` and the ``tta-serve`` entry point.

Layout: ``main`` (app factory, lifespan, entry point), ``settings``, ``errors`` (typed errors and
their one mapping to HTTP), ``api/`` (one router per resource), ``schemas``, ``imaging`` (safe
decoding), ``scheduler`` (per-model batcher), ``streams`` (stream registry, slots, store writer),
``runtime`` (a loaded model and its engine thread), ``stores`` (state stores), ``metrics``.
"""
