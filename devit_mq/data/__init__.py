"""devit_mq.data."""
