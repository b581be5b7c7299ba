import os
import sys

# hf_utils: tiny transformers CLIP models shared with the conversion tests.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
