"""The disaggregation advisor: step-time model, screen, simulator, split search, reports, apply."""
