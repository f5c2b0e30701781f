"""
The machinery the commands at the top share (train_deepspeed.py, sample.py, export.py, bench.py, plot.py,
data/prepare.py), one module per job; docs/how-it-works.md says which owns what. Imports point from the
commands into here and downwards; nothing here imports a command.
"""
import os

# the project's root, above this package: the commands, data/ and the DeepSpeed JSON files that ship
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
