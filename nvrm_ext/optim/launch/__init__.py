"""The launch side of the noise engine: a bucket's launch tables built from plain data
(plan.py), launched in host mode (host.py) or capturable mode (capturable.py), and the fast path
of a step laid out like the last one (steady.py). Nothing here imports the optimizers."""
