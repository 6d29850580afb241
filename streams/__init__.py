"""Thin glue between Kafka (the worker's consumer groups), the scoring library and Redis state."""
