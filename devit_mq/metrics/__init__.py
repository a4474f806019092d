"""devit_mq.metrics."""
