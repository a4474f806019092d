"""devit_mq.bench."""
