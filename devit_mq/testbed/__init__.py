"""``devit-mq testbed``: an edge testbed on one machine -- hosts in network namespaces with
rate-limited links and capped CPUs -- that runs DeViT, layer-wise pipeline partitioning and the
monolithic teacher over the same links (see :mod:`devit_mq.testbed.net` and
:mod:`devit_mq.testbed.runner`)."""
