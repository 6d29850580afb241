"""Thin glue between Kafka (Faust agents), the scoring library and Redis state."""
