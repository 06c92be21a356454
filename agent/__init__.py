"""Node agent: samplers, phase receiver, timeline, attribution, daemon loop."""
