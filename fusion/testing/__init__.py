"""Test helpers shipped with the library: Hypothesis strategies for deltas and stores."""
