"""Make the merging test helpers (merging_testlib.py) importable."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
