"""instructune tuning job."""
