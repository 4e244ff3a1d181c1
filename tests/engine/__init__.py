"""Engine tests against real services: invariants, crash safety, LLM faults, privacy."""
