"""instructune operator."""
