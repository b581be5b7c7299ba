"""Makes ``train_helpers`` (tiny plain-JAX MLP, tiny SAM) importable from this folder."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
