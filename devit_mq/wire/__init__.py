"""devit_mq.wire."""
