"""mote-export: Mixture-of-Ternary-Experts models to on-device runtimes."""
