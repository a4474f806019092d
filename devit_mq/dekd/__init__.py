"""devit_mq.dekd."""
