"""devit_mq.nodes."""
