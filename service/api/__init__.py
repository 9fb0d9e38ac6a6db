"""The HTTP routers: one per resource, included with their prefixes in ``service.main``."""
