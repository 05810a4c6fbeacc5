"""Benchmarks that need the test suite's local Klaviyo server (run from the repository root)."""
