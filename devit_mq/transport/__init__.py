"""devit_mq.transport."""
