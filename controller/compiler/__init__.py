"""Model compiler: one source model becomes device-specific, accuracy-gated variants."""
