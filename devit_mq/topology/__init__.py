"""devit_mq.topology."""
