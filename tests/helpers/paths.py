"""Paths of the checkout the tests run in."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "train_configs")
SCRIPTS = os.path.join(ROOT, "scripts")
