"""Graph passes over traced MoTE programs and the `mote::` ops they produce (registered on import)."""
from . import ops  # noqa: F401
