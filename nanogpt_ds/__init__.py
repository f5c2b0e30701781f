"""
The machinery the commands at the top share (train_deepspeed.py, sample.py, export.py, bench.py, plot.py,
data/prepare.py), one module per job; docs/how-it-works.md says which owns what. Imports point from the
commands into here and downwards; nothing here imports a command.
"""
